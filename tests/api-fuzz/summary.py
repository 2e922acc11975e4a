"""Per-operation summary of a schemathesis NDJSON report (tests/api-fuzz/run.sh).

    python summary.py REPORT.ndjson

Prints, for each operation, the unique test cases schemathesis kept in each
phase, the API calls it made (stateful scenarios call several operations),
and the status codes it got back.
"""

import collections
import json
import sys

PHASES = ("examples", "coverage", "fuzzing", "stateful")


def main(path):
    cases = collections.defaultdict(collections.Counter)  # label -> phase -> cases
    calls = collections.Counter()  # label -> API calls
    statuses = collections.defaultdict(collections.Counter)  # label -> status -> count
    with open(path, encoding="utf-8") as report:
        for line in report:
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            phase = finished["phase"]
            recorder = finished.get("recorder") or {}
            for case in recorder.get("cases", {}).values():
                value = case["value"]
                cases[f"{value['method']} {value['path']}"][phase] += 1
            for interaction in recorder.get("interactions", {}).values():
                request = interaction["request"]
                response = interaction.get("response")
                label = f"{request['method']} {route(request['uri'], cases)}"
                calls[label] += 1
                status = response["status_code"] if response else "no answer"
                statuses[label][status] += 1

    labels = sorted(set(cases) | set(calls), key=lambda label: label.split(" ", 1)[::-1])
    # Methods a path does not have (the coverage phase tries each once): one line.
    undocumented = [
        label
        for label in labels
        if set(statuses[label]) == {405} and sum(cases[label][p] for p in PHASES if p != "coverage") == 0
    ]
    labels = [label for label in labels if label not in undocumented]
    width = max(len(label) for label in labels)
    print(f"{'operation':<{width}}  {'examples':>8} {'coverage':>8} {'fuzzing':>8} {'stateful':>8}  {'calls':>6}  statuses")
    for label in labels:
        counts = " ".join(f"{cases[label][phase]:>8}" for phase in PHASES)
        seen = ", ".join(f"{status}: {n}" for status, n in sorted(statuses[label].items(), key=str))
        print(f"{label:<{width}}  {counts}  {calls[label]:>6}  {seen}")
    if undocumented:
        print(f"+ {len(undocumented)} methods the paths do not have: 405 each")
    total_cases = sum(sum(phases.values()) for phases in cases.values())
    total_calls = sum(calls.values())
    print(f"total: {total_cases} test cases, {total_calls} API calls")


def route(uri, cases):
    """The documented path of a request URI (`/v1/runs/0190...` -> `/v1/runs/{id}`)."""
    path = "/" + uri.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
    parts = path.split("/")
    for label in cases:
        template = label.split(" ", 1)[1].split("/")
        if len(template) == len(parts) and all(
            t == p or (t.startswith("{") and t.endswith("}")) for t, p in zip(template, parts)
        ):
            return label.split(" ", 1)[1]
    return path


if __name__ == "__main__":
    main(sys.argv[1])
