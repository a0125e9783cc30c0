// The agreement view: Kendall's tau-b between people per prompt and on average, and counts per person.
"use strict";

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell;
    tr.append(td);
  }
  document.querySelector(`#${table} tbody`).append(tr);
}

const fmt = (tau) => (tau === null ? "n/a (all tied)" : tau.toFixed(3));

(async function load() {
  const response = await fetch("/api/stats", {credentials: "same-origin"});
  if (!response.ok) {
    const el = document.getElementById("error");
    el.textContent = `could not load the statistics: ${response.status} ${await response.text()}`;
    el.hidden = false;
    return;
  }
  const stats = await response.json();
  document.getElementById("summary").textContent =
    `${stats.complete} of ${stats.total} prompts complete (${stats.min_rankings} ranking(s) each); ` +
    (stats.mean_tau === null ? "no prompt ranked by two people yet."
      : `mean Kendall's tau-b ${stats.mean_tau.toFixed(3)} over ${stats.compared_pairs} pairs of rankings.`);
  document.getElementById("summary").dataset.meanTau = stats.mean_tau === null ? "" : stats.mean_tau;
  for (const p of stats.annotators) row("people", [p.annotator, p.rankings, p.unacceptable]);
  for (const p of stats.pairs) row("pairs", [p.a, p.b, p.prompts, fmt(p.mean_tau)]);
  for (const p of stats.prompts) {
    row("prompts", [p.prompt_index, p.rankings, p.pairs.map((x) => `${x.a} / ${x.b}: ${fmt(x.tau)}`).join("; ") || "-"]);
  }
  document.body.dataset.state = "ready";
})();
