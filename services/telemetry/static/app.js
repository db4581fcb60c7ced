// The dashboard's pages, one per hash route, each reading the JSON API.
import { h, lineChart, fmtNum, pct, health } from "./svg.js";
import { drawGraph } from "./graph.js";

const page = document.getElementById("page");
const status = document.getElementById("status");
let cleanup = [];  // what the current page must stop (event sources, timers)

async function api(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function every(ms, fn) {
  fn();
  const id = setInterval(fn, ms);
  cleanup.push(() => clearInterval(id));
}

function events(url, event, fn) {
  const source = new EventSource(url);
  source.addEventListener(event, (m) => fn(JSON.parse(m.data)));
  source.onerror = () => { status.textContent = "reconnecting…"; };
  cleanup.push(() => source.close());
  return source;
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, ...headers.map((c) =>
      h("th", { class: c.startsWith("#") ? "num" : "" }, c.replace(/^#/, ""))))),
    h("tbody", {}, ...rows));
}

// fields left at their default are omitted from the records: shown empty
function td(text, cls) { return h("td", { class: cls || "" }, text === undefined || text === null ? "" : String(text)); }

function ago(ns) {
  return new Date(ns / 1e6).toLocaleTimeString();
}

// ---------------------------------------------------------------- graph

function graphPage() {
  const win = h("select", { id: "graph-window" },
    ...[[10, "10 s"], [60, "1 min"], [300, "5 min"], [600, "10 min"]].map(([v, l]) =>
      h("option", { value: v, selected: v === 60 }, l)));
  const holder = h("div", { id: "graph-holder" });
  const edges = h("div", { id: "graph-edges" });
  page.append(h("h1", {}, "Service graph"),
    h("p", {}, "Window ", win, " ", h("span", { class: "legend muted" },
      h("span", { class: "ok" }, "● ≥ 99 %"), h("span", { class: "warn" }, "● ≥ 95 %"),
      h("span", { class: "bad" }, "● < 95 %"), h("span", {}, "dashed: not mTLS"))),
    holder, h("h2", {}, "Edges"), edges);
  let source = null;
  const connect = () => {
    if (source) source.close();
    source = events(`/api/events?window=${win.value}`, "graph", (g) => {
      holder.replaceChildren(g.nodes.length ? drawGraph(g, {
        onNode: (n) => { location.hash = `#/workload/${n.namespace}/${n.workload}`; },
        onEdge: (e) => { location.hash = `#/service/${e.destination_namespace}/${
          e.destination_service.split(".")[0]}`; },
      }) : h("p", { class: "muted" }, "No traffic in this window yet."));
      edges.replaceChildren(table(
        ["Source", "Destination", "#Requests/s", "#Success", "#p50 ms", "#p90 ms", "#p99 ms",
         "mTLS", "Reporter"],
        g.edges.map((e) => h("tr", {},
          h("td", {}, h("a", { href: `#/workload/${e.source_namespace}/${e.source}` }, e.from)),
          h("td", {}, h("a", { href: `#/workload/${e.destination_namespace}/${e.destination}` },
            e.to)),
          td(fmtNum(e.rps), "num"), td(pct(e.success_rate), "num " + health(e.success_rate)),
          td(fmtNum(e.p50_ms), "num"), td(fmtNum(e.p90_ms), "num"), td(fmtNum(e.p99_ms), "num"),
          td(e.mtls === null ? "?" : pct(e.mtls)), td(e.reporter, "muted")))));
      status.textContent = `live · ${g.edges.length} edges · ${new Date().toLocaleTimeString()}`;
    });
  };
  win.addEventListener("change", connect);
  connect();
}

// ---------------------------------------------------------------- service / workload

function nodePage(kind, namespace, name) {
  const win = h("select", { id: "series-window" },
    ...[[300, "5 min"], [900, "15 min"], [1800, "30 min"], [3600, "1 h"]].map(([v, l]) =>
      h("option", { value: v }, l)));
  const body = h("div");
  const instances = h("div", { id: "instances" });
  page.append(
    h("h1", {}, `${kind === "service" ? "Service" : "Workload"} ${name}.${namespace}`),
    h("p", {}, "Window ", win, " · ", kind === "workload"
      ? h("a", { href: `#/service/${namespace}/${name.replace(/-v\d+$/, "")}` }, "its service")
      : h("a", { href: `#/traces?service=${name}` }, "its traces")),
    body, h("h2", {}, "Instances"), instances);
  const load = async () => {
    const q = new URLSearchParams({ kind, name, namespace, window: win.value });
    try {
      const [inbound, outbound] = await Promise.all([
        api(`/api/series?${q}&direction=inbound`), api(`/api/series?${q}&direction=outbound`)]);
      body.replaceChildren(direction("Inbound", inbound), direction("Outbound", outbound));
      status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) { status.textContent = String(err); }
  };
  win.addEventListener("change", load);
  every(5000, load);
  const service = kind === "service" ? name : name.replace(/-v\d+$/, "");
  api("/api/instances?" + new URLSearchParams({ service, namespace })).then((r) => {
    instances.replaceChildren(r.instances.length ? table(
      ["Instance", "Address", "Version", "Health", "Config sync"],
      r.instances.map((i) => h("tr", {}, td(i.instance), td(i.address), td(i.version),
        td(i.health, i.health === "healthy" ? "ok" : "bad"),
        td(i.sync, i.sync === "SYNCED" ? "ok" : "warn")))) :
      h("p", { class: "muted" }, "No registered instances."));
  }).catch((err) => instances.replaceChildren(h("p", { class: "muted" }, String(err))));
}

function direction(title, d) {
  const pts = d.points;
  const line = (label, key) => ({ label, points: pts.map((p) => [p.t, p[key]]) });
  const section = h("section", { "data-direction": d.direction });
  const s = d.summary;
  section.append(h("h2", {}, `${title}: ${s.requests} requests, success `,
    h("span", { class: health(s.success_rate), "data-testid": `${d.direction}-success` },
      pct(s.success_rate)), `, p99 ${fmtNum(s.p99_ms)} ms`));
  if (!s.requests && !pts.some((p) => p.tcp_sent_bytes || p.tcp_received_bytes)) {
    section.append(h("p", { class: "muted" }, "No traffic in this window."));
    return section;
  }
  const codes = Object.keys(d.by_code);
  const charts = h("div", { class: "charts" },
    lineChart([line("requests/s", "rps")], { title: "Request rate", unit: "/s" }),
    lineChart([{ label: "success", points: pts.map((p) => [p.t,
      p.success_rate === null ? null : p.success_rate * 100]) }],
      { title: "Success rate", unit: " %", max: 100 }),
    lineChart([line("p50", "p50_ms"), line("p90", "p90_ms"), line("p99", "p99_ms")],
      { title: "Latency", unit: " ms" }),
    lineChart(codes.map((c) => ({ label: c, color: c.startsWith("5") ? "#c62828" : undefined,
      points: pts.map((p) => [p.t, (p.codes[c] || 0) / d.bucket_s]) })),
      { title: "Requests/s by response code", unit: "/s" }));
  if (pts.some((p) => p.tcp_sent_bytes || p.tcp_received_bytes))
    charts.append(lineChart([line("sent", "tcp_sent_bytes"), line("received", "tcp_received_bytes")],
      { title: "TCP bytes per 10 s", unit: " B" }));
  section.append(charts, h("div", { class: "row" },
    h("div", {}, h("h2", {}, "By response code and flag"), table(["Code", "Flag", "#Requests"],
      d.by_code_flag.map((r) => h("tr", { "data-code": r.code, "data-flag": r.flag },
        td(r.code, r.code.startsWith("5") ? "bad" : ""), td(r.flag), td(r.requests, "num"))),
      { "data-testid": `${d.direction}-codes` })),
    h("div", {}, h("h2", {}, d.direction === "inbound" ? "Callers" : "Destinations"),
      table(["Peer", "#Requests", "#Success"], d.peers.map((p) => h("tr", {},
        h("td", {}, h("a", { href: `#/workload/${p.peer.split(".").slice(1).join(".")}/${
          p.peer.split(".")[0]}` }, p.peer)),
        td(p.requests, "num"), td(pct(p.success_rate), "num " + health(p.success_rate))))))));
  return section;
}

// ---------------------------------------------------------------- traces

function tracesPage(params) {
  const field = (name, attrs) => h("input", { name, value: params.get(name) || "", ...attrs });
  const form = h("form", { class: "filters", id: "trace-search" },
    h("label", {}, "Service", field("service", { size: 14 })),
    h("label", {}, "Min duration (ms)", field("min_ms", { size: 6, type: "number", min: 0 })),
    h("label", {}, "Trace id", field("trace_id", { size: 34 })),
    h("label", {}, "Errors only", h("input", { type: "checkbox", name: "errors",
      checked: params.get("errors") === "1" })),
    h("button", { type: "submit" }, "Search"));
  const results = h("div", { id: "trace-results" });
  page.append(h("h1", {}, "Traces"), form, results);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, k === "errors" ? "1" : v);
    location.hash = "#/traces?" + q;
  });
  const q = new URLSearchParams(params);
  q.set("limit", "50");
  api("/api/traces?" + q).then((r) => {
    results.replaceChildren(r.traces.length ? table(
      ["Trace", "Root", "Services", "#Spans", "#Duration ms", "Started", "Error"],
      r.traces.map((t) => h("tr", { "data-trace": t.trace_id },
        h("td", {}, h("a", { href: `#/trace/${t.trace_id}` }, t.trace_id.slice(0, 16) + "…")),
        td(`${t.root_service}: ${t.root}`), td(t.services.join(", ")), td(t.spans, "num"),
        td(fmtNum(t.duration_ms), "num"), td(ago(t.start_ns)),
        td(t.error ? "error" : "", t.error ? "bad" : "")))) :
      h("p", { class: "muted" }, "No trace matches."));
  }).catch((err) => results.replaceChildren(h("p", { class: "bad" }, String(err))));
}

function tracePage(traceId) {
  const holder = h("div", { class: "waterfall", id: "waterfall" });
  page.append(h("h1", {}, "Trace ", h("code", {}, traceId)), holder);
  api(`/api/traces/${traceId}`).then((t) => {
    const rows = [];
    const walk = (node, depth) => {
      rows.push([node, depth]);
      node.children.forEach((c) => walk(c, depth + 1));
    };
    t.roots.forEach((r) => walk(r, 0));
    const start = t.start_ns, total = Math.max(t.duration_ms, 0.001);
    holder.append(h("p", { class: "muted" },
      `${t.spans} spans · ${fmtNum(t.duration_ms)} ms · ${t.services.join(", ")} · started ${
        ago(start)}`));
    rows.forEach(([span, depth], i) => {
      const left = ((span.start_ns - start) / 1e6 / total) * 100;
      const width = Math.max((span.duration_ms / total) * 100, 0.3);
      const attrs = h("div", { class: "attrs", hidden: true }, table(["Attribute", "Value"],
        Object.entries({ kind: span.kind, service: span.service, namespace: span.namespace,
          instance: span.instance, status_code: span.status_code, span_id: span.span_id,
          parent_span_id: span.parent_span_id || "(root)", ...span.attributes })
          .map(([k, v]) => h("tr", {}, td(k), td(v)))));
      const row = h("div", { class: "span-row", "data-index": i, "data-service": span.service,
        "data-kind": span.kind, "data-span": span.span_id },
        h("div", { style: `padding-left:${depth * 14}px` },
          h("b", {}, span.service), ` ${span.kind} · `, h("span", { class: "muted" }, span.name)),
        h("div", {}, h("div", { class: "bar" + (span.error ? " error" : ""),
          style: `margin-left:${left}%;width:${width}%` })),
        h("div", { class: "num" }, `${fmtNum(span.duration_ms)} ms`), attrs);
      row.addEventListener("click", () => { attrs.hidden = !attrs.hidden; });
      holder.append(row);
    });
  }).catch((err) => holder.append(h("p", { class: "bad" }, String(err))));
}

// ---------------------------------------------------------------- access log

function accessPage(params) {
  const field = (name, size) => h("input", { name, size, value: params.get(name) || "" });
  const form = h("form", { class: "filters", id: "access-filters" },
    h("label", {}, "Service", field("service", 14)), h("label", {}, "Status", field("status", 5)),
    h("label", {}, "Flag", field("flag", 5)), h("label", {}, "Path contains", field("path", 20)),
    h("button", { type: "submit" }, "Filter"));
  const rows = h("tbody");
  page.append(h("h1", {}, "Access log (live)"), form, h("table", { id: "access-log" },
    h("thead", {}, h("tr", {}, ...["Time", "Proxy", "Reporter", "Method", "Authority", "Path",
      "Status", "Flags", "ms", "Upstream", "Trace"].map((c) => h("th", {}, c)))), rows));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = "#/access?" + q;
  });
  events("/api/access/events?" + params, "access", (r) => {
    rows.prepend(h("tr", { "data-status": r.status, "data-flags": r.response_flags },
      td(ago(r.time_ns)), td(r.proxy_service), td(r.reporter), td(r.method), td(r.authority),
      td(r.path), td(r.status, r.status >= 500 || r.status === 0 ? "bad" : ""),
      td(r.response_flags), td(fmtNum(r.duration_ms), "num"), td(r.upstream_host),
      h("td", {}, r.trace_id ? h("a", { href: `#/trace/${r.trace_id}` },
        r.trace_id.slice(0, 8)) : "")));
    while (rows.children.length > 500) rows.lastChild.remove();
    status.textContent = `live · ${rows.children.length} records`;
  });
}

// ---------------------------------------------------------------- config

function configPage() {
  const holder = h("div", { id: "config" });
  page.append(h("h1", {}, "Configuration in force"), holder);
  api("/api/config").then((c) => {
    holder.append(h("p", { class: "muted" }, `revision ${c.revision}`));
    const kinds = Object.entries(c.kinds);
    if (!kinds.length) holder.append(h("p", { class: "muted" }, "No resources applied."));
    for (const [kind, resources] of kinds) {
      holder.append(h("h2", {}, `${kind} (${resources.length})`), table(
        ["Namespace", "Name", "#Revision", "Spec"],
        resources.map((r) => h("tr", { "data-kind": kind, "data-name": r.name },
          td(r.namespace), td(r.name), td(r.revision, "num"),
          h("td", {}, h("details", {}, h("summary", {}, "spec"),
            h("pre", {}, JSON.stringify(r.spec, null, 2))))))));
    }
    holder.append(h("h2", {}, "Proxy status"), table(
      ["Proxy", "Service", "Subject", "#Applied", "#Latest", "State", "Reason"],
      c.proxies.map((p) => h("tr", {}, td(p.proxy), td(`${p.service}.${p.namespace}`),
        td(p.subject), td(p.applied_revision, "num"), td(p.latest_revision, "num"),
        td(p.state, p.state === "SYNCED" ? "ok" : "bad"), td(p.reason)))));
  }).catch((err) => holder.append(h("p", { class: "bad" }, String(err))));
}

// ---------------------------------------------------------------- router

function route() {
  cleanup.forEach((f) => f());
  cleanup = [];
  page.replaceChildren();
  status.textContent = "";
  const [path, query] = (location.hash.slice(1) || "/graph").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a"))
    a.classList.toggle("active", a.dataset.nav === parts[0]);
  if (parts[0] === "workload" || parts[0] === "service") nodePage(parts[0], parts[1], parts[2]);
  else if (parts[0] === "traces") tracesPage(params);
  else if (parts[0] === "trace") tracePage(parts[1]);
  else if (parts[0] === "access") accessPage(params);
  else if (parts[0] === "config") configPage();
  else graphPage();
}

window.addEventListener("hashchange", route);
route();
