// Small helpers to build DOM and SVG, and a line chart drawn as SVG.
const SVG_NS = "http://www.w3.org/2000/svg";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

export const COLORS = ["#4a7bd0", "#e07b39", "#7a4bc2", "#2a9d8f", "#c62828", "#8d6e63"];

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// lines: [{label, points: [[t, value|null], ...]}]; opts: {title, unit, max, width, height}
export function lineChart(lines, opts = {}) {
  const W = opts.width || 440, H = opts.height || 170;
  const L = 48, R = 10, T = 22, B = 22;
  const all = lines.flatMap((l) => l.points);
  const ts = all.map((p) => p[0]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  const vals = all.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
  const ymax = opts.max !== undefined ? opts.max : niceMax(Math.max(0, ...vals));
  const x = (t) => L + (t1 > t0 ? ((t - t0) / (t1 - t0)) * (W - L - R) : (W - L - R) / 2);
  const y = (v) => T + (1 - v / ymax) * (H - T - B);
  const svg = s("svg", { width: W, height: H, class: "chart", "data-title": opts.title || "" });
  svg.append(s("text", { x: 4, y: 14, "font-weight": 600 }, opts.title || ""));
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    svg.append(
      s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eee" }),
      s("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", fill: "#777" },
        fmtNum(v) + (opts.unit || "")));
  }
  if (!all.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#999" }, "no data"));
    return svg;
  }
  svg.append(
    s("text", { x: L, y: H - 6, fill: "#777" }, clock(t0)),
    s("text", { x: W - R, y: H - 6, fill: "#777", "text-anchor": "end" }, clock(t1)));
  lines.forEach((line, i) => {
    let d = "";
    let pen = false;
    for (const [t, v] of line.points) {
      if (v === null || v === undefined) { pen = false; continue; }
      d += (pen ? "L" : "M") + x(t).toFixed(1) + "," + y(Math.min(v, ymax)).toFixed(1);
      pen = true;
    }
    const color = line.color || COLORS[i % COLORS.length];
    svg.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 1.8 }));
    for (const [t, v] of line.points) {
      if (v !== null && v !== undefined)
        svg.append(s("circle", { cx: x(t), cy: y(Math.min(v, ymax)), r: 1.8, fill: color },
          s("title", {}, `${line.label}: ${fmtNum(v)}${opts.unit || ""} at ${clock(t)}`)));
    }
    if (lines.length > 1)
      svg.append(s("text", { x: L + 8 + i * 70, y: T + 10, fill: color }, line.label));
  });
  return svg;
}

export function fmtNum(v) {
  if (v === null || v === undefined) return "-";
  if (Math.abs(v) >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
}

export function pct(rate) {
  return rate === null || rate === undefined ? "-" : (rate * 100).toFixed(1) + " %";
}

export function health(rate) {
  if (rate === null || rate === undefined) return "muted";
  return rate >= 0.99 ? "ok" : rate >= 0.95 ? "warn" : "bad";
}
