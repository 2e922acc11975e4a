// Small SVG charts for the metrics: a stacked bar of outcomes and paired
// horizontal bars per step. Each has a text equivalent for screen readers.

interface Part {
  label: string;
  value: number;
  tone: string;
}

export function StackBar({ name, label, parts }: { name: string; label: string; parts: Part[] }) {
  const total = parts.reduce((n, p) => n + p.value, 0);
  const width = 400;
  let x = 0;
  const summary = parts.map((p) => `${p.value} ${p.label}`).join(", ");
  return (
    <figure class="chart">
      <figcaption>{label}</figcaption>
      <svg
        data-chart={name}
        role="img"
        aria-label={`${label}: ${summary}`}
        viewBox={`0 0 ${width} 24`}
        preserveAspectRatio="none"
        width="100%"
        height="24"
      >
        {total === 0 ? (
          <rect class="empty" width={width} height={24} />
        ) : (
          parts.map((p) => {
            const w = (p.value / total) * width;
            const rect = <rect key={p.label} class={`tone-${p.tone}`} x={x} width={w} height={24} />;
            x += w;
            return rect;
          })
        )}
      </svg>
      <p class="legend">
        {parts.map((p) => (
          <span key={p.label} class={`key tone-${p.tone}`}>
            {p.label} {p.value}
          </span>
        ))}
      </p>
    </figure>
  );
}

interface Row {
  label: string;
  a: number | null;
  b: number | null;
}

export function BarChart({
  name,
  label,
  rows,
  legend,
  format,
}: {
  name: string;
  label: string;
  rows: Row[];
  legend: [string, string];
  format: (n: number | null) => string;
}) {
  const max = Math.max(1, ...rows.flatMap((r) => [r.a ?? 0, r.b ?? 0]));
  const labelWidth = 130;
  const barWidth = 200;
  const valueWidth = 130;
  const rowHeight = 26;
  const width = labelWidth + barWidth + valueWidth;
  const summary = rows.map((r) => `${r.label}: ${legend[0]} ${format(r.a)}, ${legend[1]} ${format(r.b)}`).join("; ");
  return (
    <figure class="chart">
      <figcaption>{label}</figcaption>
      <svg
        data-chart={name}
        role="img"
        aria-label={`${label}. ${summary}`}
        viewBox={`0 0 ${width} ${rows.length * rowHeight}`}
        preserveAspectRatio="xMinYMin meet"
        width="100%"
        height={rows.length * rowHeight}
      >
        {rows.map((r, i) => {
          const y = i * rowHeight;
          const text = r.label.length > 18 ? r.label.slice(0, 17) + "…" : r.label;
          return (
            <g key={r.label} transform={`translate(0,${y})`}>
              <text x={0} y={16} class="axis">
                {text}
              </text>
              <rect class="bar-b" x={labelWidth} y={3} height={9} width={((r.b ?? 0) / max) * barWidth} />
              <rect class="bar-a" x={labelWidth} y={13} height={9} width={((r.a ?? 0) / max) * barWidth} />
              <text x={labelWidth + barWidth + 8} y={16} class="axis">
                {format(r.a)} / {format(r.b)}
              </text>
            </g>
          );
        })}
      </svg>
      <p class="legend">
        <span class="key bar-a">{legend[0]}</span> <span class="key bar-b">{legend[1]}</span>
      </p>
    </figure>
  );
}
