//! The workflow shapes the in-process part runs, as workflow files (TOML), with
//! the input each run gets and the output it must give: a run that does not
//! succeed with exactly that output fails the benchmark.
//!
//! Every step is the `noop` fixture (returns its input) passing a small JSON
//! object on, except the sum at the end of a fan-out, which is `aggregate`.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// What every chain, diamond and single step starts from.
fn small_object() -> Value {
    json!({ "order": "A-1001", "qty": 3, "tags": ["bench", "noop"] })
}

/// One workflow shape.
pub struct Workload {
    /// Also the workflow's name: `chain40`.
    pub name: &'static str,
    /// The workflow file.
    pub source: String,
    pub input: Value,
    /// The run's output when it works.
    pub expected: Value,
    /// Step attempts one run makes (a `for_each` item is one).
    pub steps: usize,
    /// Issue 6's target for one run, in ms.
    pub target_ms: Option<f64>,
    /// Most of its steps run at once (a fan-out's items), on every worker
    /// thread: its ratio is taken against the limit measured with as many
    /// calls at once, not against one call alone.
    pub parallel: bool,
}

/// One `noop` step.
pub fn single() -> Workload {
    let source = r#"name = "step1"
[[step]]
id = "only"
plugin = "noop"
input = "{{ input }}"

[output]
result = "{{ steps.only.output }}"
"#;
    Workload {
        name: "step1",
        source: source.to_string(),
        input: small_object(),
        expected: json!({ "result": small_object() }),
        steps: 1,
        target_ms: None,
        parallel: false,
    }
}

/// `n` `noop` steps in a row, each passing the object on to the next.
pub fn chain(name: &'static str, n: usize, target_ms: Option<f64>) -> Workload {
    let mut source = format!("name = \"{name}\"\n");
    for i in 0..n {
        let input = if i == 0 {
            "{{ input }}".to_string()
        } else {
            format!("{{{{ steps.s{}.output }}}}", i - 1)
        };
        write!(
            source,
            "\n[[step]]\nid = \"s{i}\"\nplugin = \"noop\"\ninput = \"{input}\"\n"
        )
        .expect("writing to a String");
    }
    write!(
        source,
        "\n[output]\nresult = \"{{{{ steps.s{}.output }}}}\"\n",
        n - 1
    )
    .expect("writing to a String");
    Workload {
        name,
        source,
        input: small_object(),
        expected: json!({ "result": small_object() }),
        steps: n,
        target_ms,
        parallel: false,
    }
}

/// One step makes a list of `n` numbers (a `noop` returning the list in its
/// input), a `for_each` step runs once per item, and `aggregate` sums them.
pub fn fanout(name: &'static str, n: usize, target_ms: Option<f64>) -> Workload {
    let source = format!(
        r#"name = "{name}"

[[step]]
id = "make"
plugin = "noop"
input = "{{{{ input.items }}}}"

[[step]]
id = "each"
plugin = "noop"
for_each = "{{{{ steps.make.output }}}}"
input = {{ i = "{{{{ item }}}}", text = "bench" }}

[[step]]
id = "sum"
plugin = "aggregate"
input = {{ values = "{{{{ steps.each.output | map(attribute='i') | list }}}}" }}

[output]
count = "{{{{ steps.sum.output.count }}}}"
sum = "{{{{ steps.sum.output.sum }}}}"
"#
    );
    let items: Vec<usize> = (0..n).collect();
    Workload {
        name,
        source,
        input: json!({ "items": items }),
        expected: json!({ "count": n, "sum": n * (n - 1) / 2 }),
        steps: n + 2,
        target_ms,
        parallel: true,
    }
}

/// a -> (b, c) -> d.
pub fn diamond() -> Workload {
    let source = r#"name = "diamond"

[[step]]
id = "a"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "b"
plugin = "noop"
input = { branch = "b", value = "{{ steps.a.output }}" }

[[step]]
id = "c"
plugin = "noop"
input = { branch = "c", value = "{{ steps.a.output }}" }

[[step]]
id = "d"
plugin = "noop"
input = { b = "{{ steps.b.output.value }}", c = "{{ steps.c.output.value }}" }

[output]
result = "{{ steps.d.output }}"
"#;
    Workload {
        name: "diamond",
        source: source.to_string(),
        input: small_object(),
        expected: json!({ "result": { "b": small_object(), "c": small_object() } }),
        steps: 4,
        target_ms: None,
        parallel: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_passes_each_output_to_the_next_step() {
        let chain = chain("chain3", 3, None);
        assert!(
            chain
                .source
                .contains("id = \"s0\"\nplugin = \"noop\"\ninput = \"{{ input }}\"")
        );
        assert!(
            chain
                .source
                .contains("id = \"s2\"\nplugin = \"noop\"\ninput = \"{{ steps.s1.output }}\"")
        );
        assert!(
            chain
                .source
                .ends_with("result = \"{{ steps.s2.output }}\"\n")
        );
        assert_eq!(chain.steps, 3);
    }

    #[test]
    fn a_fanout_expects_the_sum_of_its_items() {
        let fanout = fanout("fanout4", 4, None);
        assert_eq!(fanout.input, json!({ "items": [0, 1, 2, 3] }));
        assert_eq!(fanout.expected, json!({ "count": 4, "sum": 6 }));
        assert_eq!(fanout.steps, 6);
        assert!(
            fanout
                .source
                .contains("for_each = \"{{ steps.make.output }}\"")
        );
    }
}
