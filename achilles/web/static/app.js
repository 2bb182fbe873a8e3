// The dashboard: one server-sent event a second carries the whole view (a JSON snapshot);
// the tables are rebuilt from it. Everything from the cluster is set as text
// (textContent), never as markup: node names and tracebacks come from peers.
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) tr.appendChild(c);
  return tr;
}

const num = (v, cls) => el("td", v, "n" + (cls ? " " + cls : ""));

function bytes(n) {
  if (n === null || n === undefined || n < 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function secs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function rate(r) { return r >= 100 ? r.toFixed(0) : r.toFixed(1); }

function replaceBody(id, rows, empty, cols) {
  const body = document.querySelector("#" + id + " tbody");
  const next = document.createElement("tbody");
  for (const r of rows) next.appendChild(r);
  if (!rows.length) {
    const td = el("td", empty, "empty");
    td.colSpan = cols;
    next.appendChild(row([td]));
  }
  body.replaceWith(next);
}

function state(s) {
  const td = el("td");
  td.appendChild(el("span", s, "state " + s));
  return td;
}

function renderNodes(snap) {
  const rows = snap.nodes.map((n) => {
    const tr = row([
      el("td", n.name, "name"),
      el("td", n.address),
      num(n.busy + " / " + n.slots),
      num(n.queued),
      num(n.done),
      num(rate(n.rate)),
      num(n.cpu < 0 ? "–" : n.cpu.toFixed(0) + " %"),
      num(bytes(n.rss)),
      num(secs(n.heard) + " ago"),
      state(n.state),
    ]);
    tr.dataset.node = n.name;
    return tr;
  });
  for (const n of snap.lost) {
    const tr = row([
      el("td", n.name, "name"), el("td", n.address), num("–"), num("–"), num(n.done),
      num("–"), num("–"), num("–"), num(secs(n.ago) + " ago"), state("lost"),
    ], "lost");
    rows.push(tr);
  }
  replaceBody("nodes", rows, "no nodes connected", 10);
}

function bar(job) {
  const td = el("td", null, "bar");
  const track = el("div", null, "track");
  const total = job.total === null ? job.added : job.total;
  const frac = total > 0 ? Math.min(1, job.done / total) : 0;
  const fill = el("div", null, "fill" + (job.failures ? " failing" : ""));
  fill.style.width = (frac * 100).toFixed(1) + "%";
  track.appendChild(fill);
  const label = job.done + " / " + (job.total === null ? job.added + "+" : job.total) +
    (total > 0 ? "  (" + Math.floor(frac * 100) + " %)" : "");
  track.appendChild(el("span", label, "label"));
  td.appendChild(track);
  return td;
}

function renderJobs(snap) {
  const rows = snap.jobs.map((j) => {
    const tr = row([
      el("td", j.id.slice(0, 8), "name"),
      el("td", j.function || "?"),
      el("td", j.owner),
      bar(j),
      num(j.items_rate === null || j.items_rate === undefined
        ? rate(j.rate) + " chunks/s" : rate(j.items_rate) + " items/s"),
      num(j.eta === null ? "–" : secs(j.eta)),
      num(j.inflight),
      num(j.retries),
      num(j.failures, j.failures ? "bad" : ""),
      num(secs(j.elapsed)),
    ]);
    tr.dataset.job = j.id;
    return tr;
  });
  replaceBody("jobs", rows, "no jobs running", 10);
}

function renderFailures(snap) {
  const box = document.getElementById("failures");
  const next = el("div");
  next.id = "failures";
  for (const f of snap.failures) {
    const div = el("div", null, "failure");
    div.dataset.kind = f.kind;
    const head = el("div");
    head.appendChild(el("span", f.kind, "kind"));
    head.appendChild(el("span", "  ×" + f.count, "count"));
    div.appendChild(head);
    const last = f.samples[f.samples.length - 1];
    if (last) {
      div.appendChild(el("div", "latest: chunk " + last.seq + " of job " + last.job.slice(0, 8) +
        " on " + last.node, "where"));
      div.appendChild(el("pre", last.traceback));
    }
    next.appendChild(div);
  }
  if (!snap.failures.length) next.appendChild(el("div", "no failures", "empty"));
  box.replaceWith(next);
  for (const pre of next.querySelectorAll("pre")) pre.scrollTop = pre.scrollHeight; // the error line

  const sbox = document.getElementById("stragglers");
  const snext = el("div");
  snext.id = "stragglers";
  for (const s of snap.stragglers) {
    snext.appendChild(el("div", s.name + ": holds " + s.holding + " chunk(s), none finished for " +
      secs(s.idle_for)));
  }
  if (!snap.stragglers.length) snext.appendChild(el("div", "none", "empty"));
  sbox.replaceWith(snext);
}

function renderEvents(snap) {
  const list = document.getElementById("events");
  const next = el("ol");
  next.id = "events";
  const offset = snap.wall - snap.now; // server clock to wall clock
  for (const e of snap.events.slice().reverse()) {
    const li = el("li");
    const t = new Date((e.at + offset) * 1000);
    li.appendChild(el("span", t.toLocaleTimeString(), "t"));
    li.appendChild(el("span", e.kind, "k " + e.kind));
    li.appendChild(el("span", e.text));
    next.appendChild(li);
  }
  if (!snap.events.length) next.appendChild(el("li", "nothing yet", "empty"));
  list.replaceWith(next);
}

function render(snap) {
  const t = snap.totals;
  document.getElementById("summary").textContent =
    snap.nodes.length + " node(s) · " + t.busy + " of " + t.slots + " slots busy · " +
    snap.jobs.length + " job(s) · " + rate(t.rate) + " chunks/s · " + t.failures + " failure(s)";
  renderNodes(snap);
  renderJobs(snap);
  renderFailures(snap);
  renderEvents(snap);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/events");
  source.onopen = () => { conn.className = "conn live"; conn.title = "live"; };
  source.onmessage = (m) => render(JSON.parse(m.data));
  source.onerror = () => { conn.className = "conn"; conn.title = "reconnecting"; };
}

connect();
