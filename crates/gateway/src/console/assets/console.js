// Portcullis console: enhancements only. Every page works without this
// file; it adds the live audit stream and keyboard shortcuts.
"use strict";

(function () {
  function text(v) { return v === undefined || v === null ? "" : String(v); }

  function cell(row, value, cls) {
    var td = document.createElement("td");
    if (cls) { var s = document.createElement("span"); s.className = cls; s.textContent = value; td.appendChild(s); }
    else { td.textContent = value; }
    row.appendChild(td);
  }

  function clock(ms) {
    var d = new Date(Number(ms));
    return isNaN(d.getTime()) ? "" : d.toISOString().substring(11, 19) + " UTC";
  }

  // The live stream: one table row per audit record, newest first.
  function liveStream() {
    var table = document.getElementById("stream");
    if (!table || !window.EventSource) { return; }
    var body = table.querySelector("tbody");
    var status = document.getElementById("stream-status");
    var q = new URLSearchParams();
    ["task", "agent", "kind"].forEach(function (k) {
      var v = table.dataset[k];
      if (v) { q.set(k === "task" ? "task_id" : k, v); }
    });
    var source = new EventSource("/console/events?" + q.toString());
    source.addEventListener("open", function () { status.textContent = "Connected: new records appear at the top as they are committed."; });
    source.addEventListener("error", function () { status.textContent = "Disconnected; reconnecting (no record is skipped)…"; });
    source.addEventListener("audit", function (ev) {
      var r;
      try { r = JSON.parse(ev.data); } catch (e) { return; }
      var tr = document.createElement("tr");
      tr.className = "new " + text(r.decision) + " kind-" + text(r.kind).replace(/\./g, "-");
      tr.dataset.kind = text(r.kind);
      cell(tr, text(r.seq));
      cell(tr, clock(r.ts));
      cell(tr, text(r.kind));
      var td = document.createElement("td");
      if (r.task_id) { var a = document.createElement("a"); a.href = "/console/tasks/" + encodeURIComponent(r.task_id); a.textContent = r.task_id; td.appendChild(a); }
      tr.appendChild(td);
      cell(tr, text(r.agent_id));
      cell(tr, text(r.tool));
      cell(tr, text(r.decision), r.decision ? "decision " + r.decision : "");
      cell(tr, (r.reason ? r.reason + " " : "") + text(r.detail));
      body.insertBefore(tr, body.firstChild);
      setTimeout(function () { tr.classList.remove("new"); }, 4000);
      while (body.rows.length > 500) { body.deleteRow(body.rows.length - 1); }
    });
  }

  // Approvals: j/k move between requests, a approves, d denies, n goes to
  // the note field. Keys typed into a field are left alone.
  function approvalKeys() {
    var items = Array.prototype.slice.call(document.querySelectorAll("li.approval"));
    if (!items.length) { return; }
    var at = 0;
    var fromHash = items.findIndex(function (li) { return "#" + li.id === window.location.hash; });
    if (fromHash >= 0) { at = fromHash; }
    function select(i) {
      items.forEach(function (li) { li.classList.remove("selected"); });
      at = Math.max(0, Math.min(items.length - 1, i));
      items[at].classList.add("selected");
      items[at].focus();
      if (window.history && window.history.replaceState) { window.history.replaceState(null, "", "#" + items[at].id); }
    }
    items.forEach(function (li, i) { li.addEventListener("focus", function () { if (at !== i) { select(i); } }); });
    select(at);
    document.addEventListener("keydown", function (ev) {
      var t = ev.target;
      if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) { return; }
      var li = items[at];
      if (ev.key === "j") { select(at + 1); ev.preventDefault(); }
      else if (ev.key === "k") { select(at - 1); ev.preventDefault(); }
      else if (ev.key === "n") { li.querySelector("input[name=note]").focus(); ev.preventDefault(); }
      else if (ev.key === "a") { li.querySelector("button.approve").click(); ev.preventDefault(); }
      else if (ev.key === "d") { li.querySelector("button.deny").click(); ev.preventDefault(); }
    });
  }

  // The approvals page reloads itself while idle so new requests show up.
  function refreshApprovals() {
    if (document.body.dataset.page !== "approvals") { return; }
    setInterval(function () {
      var active = document.activeElement;
      var typing = active && active.tagName === "INPUT" && active.value;
      if (!typing) { window.location.reload(); }
    }, 5000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    liveStream();
    approvalKeys();
    refreshApprovals();
  });
})();
