// The service graph as SVG: workloads in columns by call depth, edges as curves
// coloured by success rate, dashed when not mutual TLS.
import { s, fmtNum, pct, health } from "./svg.js";

const COLOR = { ok: "#1f8a3b", warn: "#c77700", bad: "#c62828", muted: "#999" };
const COL_W = 250, ROW_H = 120, PAD = 70;

export function layout(nodes, edges) {
  const depth = new Map(nodes.map((n) => [n.id, 0]));
  // longest path from the callers, bounded so that cycles end
  for (let i = 0; i < nodes.length; i++) {
    let changed = false;
    for (const e of edges) {
      if (e.from === e.to) continue;
      const d = depth.get(e.from) + 1;
      if (d > depth.get(e.to) && d < nodes.length) { depth.set(e.to, d); changed = true; }
    }
    if (!changed) break;
  }
  const columns = new Map();
  for (const n of [...nodes].sort((a, b) => a.id.localeCompare(b.id))) {
    const d = depth.get(n.id);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const pos = new Map();
  const tallest = Math.max(1, ...[...columns.values()].map((c) => c.length));
  for (const [d, column] of columns) {
    const offset = ((tallest - column.length) * ROW_H) / 2;
    column.forEach((n, i) => pos.set(n.id, { x: PAD + d * COL_W, y: PAD + offset + i * ROW_H }));
  }
  const width = PAD * 2 + Math.max(0, ...depth.values()) * COL_W + 120;
  const height = PAD * 2 + (tallest - 1) * ROW_H;
  return { pos, width, height };
}

export function drawGraph(graph, { onNode, onEdge }) {
  const { pos, width, height } = layout(graph.nodes, graph.edges);
  const svg = s("svg", { class: "graph", width, height, "data-testid": "graph" });
  const defs = s("defs");
  for (const [name, color] of Object.entries(COLOR))
    defs.append(s("marker", { id: "arrow-" + name, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", fill: color })));
  svg.append(defs);
  const nodeHealth = new Map();
  for (const e of graph.edges) {
    const worst = nodeHealth.get(e.to);
    if (worst === undefined || e.success_rate < worst) nodeHealth.set(e.to, e.success_rate);
  }
  for (const e of graph.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const cls = health(e.success_rate);
    const r = 22;
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const x1 = a.x + (dx / len) * r, y1 = a.y + (dy / len) * r;
    const x2 = b.x - (dx / len) * r, y2 = b.y - (dy / len) * r;
    const mx = (x1 + x2) / 2 - (dy / len) * 18, my = (y1 + y2) / 2 + (dx / len) * 18;
    const d = `M${x1},${y1} Q${mx},${my} ${x2},${y2}`;
    const mtls = e.mtls === null || e.mtls === undefined ? "mTLS ?" : e.mtls >= 1 ? "mTLS"
      : e.mtls > 0 ? `mTLS ${(e.mtls * 100).toFixed(0)} %` : "plaintext";
    const g = s("g", { class: "edge " + cls, "data-from": e.from, "data-to": e.to,
      "data-success": e.success_rate, "data-mtls": e.mtls ?? "",
      onclick: () => onEdge(e) },
      s("path", { d, stroke: COLOR[cls], "marker-end": `url(#arrow-${cls})`,
        "stroke-dasharray": e.mtls !== null && e.mtls !== undefined && e.mtls < 1 ? "6 4" : null }),
      s("path", { d, class: "hit" }),
      s("text", { x: mx, y: my - 14, "text-anchor": "middle", class: "edge-rps" },
        `${fmtNum(e.rps)} rps · p99 ${fmtNum(e.p99_ms)} ms`),
      s("text", { x: mx, y: my, "text-anchor": "middle", class: "edge-success",
        fill: COLOR[cls] }, pct(e.success_rate)),
      s("text", { x: mx, y: my + 13, "text-anchor": "middle", fill: "#555", class: "edge-mtls" },
        mtls),
      s("title", {}, `${e.from} → ${e.to} (${e.destination_service}), reported by ${e.reporter}`));
    svg.append(g);
  }
  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const cls = health(nodeHealth.get(n.id));
    svg.append(s("g", { class: "node", "data-id": n.id, onclick: () => onNode(n) },
      s("circle", { cx: p.x, cy: p.y, r: 22, fill: cls === "muted" ? "#dfe6ee" : COLOR[cls],
        "fill-opacity": 0.25 }),
      s("text", { x: p.x, y: p.y + 38, "text-anchor": "middle", "font-weight": 600 }, n.workload),
      s("text", { x: p.x, y: p.y + 52, "text-anchor": "middle", fill: "#777" },
        `${n.namespace} · in ${fmtNum(n.rps_in)} rps`)));
  }
  return svg;
}
