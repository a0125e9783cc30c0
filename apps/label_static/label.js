// instructflow label: rank one prompt's responses, best first, by dragging (mouse events) or with the keyboard.
// The ranking goes to the server on submit (kept in SQLite there); the arrangement in progress is kept in this
// browser (localStorage) so a reload finds it as it was.
"use strict";

const NAME_KEY = "instructflow-label-annotator";
const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  annotator: null,
  item: null,          // {prompt_index, prompt, responses}
  ranked: [],          // [{index, tied}] best first; tied: in one tier with the card above
  unacceptable: new Set(),
  focused: null,       // a response index
  busy: false,
};

function setState(name) { document.body.dataset.state = name; }

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, {credentials: "same-origin", ...options,
    headers: {"Content-Type": "application/json", ...(options.headers || {})}});
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail;
    throw new Error(typeof detail === "string" ? detail : (detail ? JSON.stringify(detail) : `${response.status} ${response.statusText}`));
  }
  return body;
}

// ---------------------------------------------------------------------------------------- who is ranking
function askName() {
  $("work").hidden = true;
  $("done").hidden = true;
  $("who").hidden = true;
  $("name-form").hidden = false;
  $("name").value = state.annotator || "";
  $("name").focus();
  setState("name");
}

$("name-entry").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  state.annotator = name;
  localStorage.setItem(NAME_KEY, name);
  $("name-form").hidden = true;
  loadNext();
});

$("rename").addEventListener("click", askName);
$("again").addEventListener("click", () => loadNext());

// ---------------------------------------------------------------------------------------- drafts
function draftKey() {
  return `instructflow-label-draft:${state.config.generation}:${state.annotator}:${state.item.prompt_index}`;
}

function saveDraft() {
  if (!state.item) return;
  localStorage.setItem(draftKey(), JSON.stringify({ranked: state.ranked, unacceptable: [...state.unacceptable]}));
}

function loadDraft() {
  state.ranked = [];
  state.unacceptable = new Set();
  const raw = localStorage.getItem(draftKey());
  if (!raw) return;
  try {
    const draft = JSON.parse(raw);
    const k = state.item.responses.length;
    const seen = new Set();
    for (const entry of draft.ranked || []) {
      if (Number.isInteger(entry.index) && entry.index >= 0 && entry.index < k && !seen.has(entry.index)) {
        seen.add(entry.index);
        state.ranked.push({index: entry.index, tied: Boolean(entry.tied) && state.config.allow_ties && state.ranked.length > 0});
      }
    }
    for (const i of draft.unacceptable || []) if (Number.isInteger(i) && i >= 0 && i < k) state.unacceptable.add(i);
  } catch (e) { /* an unreadable draft: start afresh */ }
}

// ---------------------------------------------------------------------------------------- loading
function showProgress(progress) {
  if (!progress) return;
  $("progress").textContent = `you: ${progress.done} of ${progress.total} ranked · complete: ${progress.complete} of ` +
    `${progress.total} prompts (${progress.min_rankings} ranking${progress.min_rankings > 1 ? "s" : ""} each)`;
  $("progress").dataset.done = progress.done;
  $("progress").dataset.complete = progress.complete;
}

async function loadNext() {
  showError("");
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  setState("loading");
  let body;
  try {
    body = await api(`/api/next?annotator=${encodeURIComponent(state.annotator)}`);
  } catch (e) {
    showError(`could not load the next prompt: ${e.message}`);
    setState("error");
    return;
  }
  $("who").hidden = false;
  $("annotator").textContent = state.annotator;
  showProgress(body.progress);
  if (body.prompt_index === null) {
    state.item = null;
    $("work").hidden = true;
    $("done").hidden = false;
    $("done-text").textContent = body.reason === "held"
      ? "The prompts left for you are being ranked by others right now. Check again in a while."
      : "Nothing left for you: every prompt is complete or ranked by you. Thank you!";
    setState(body.reason === "held" ? "held" : "done");
    return;
  }
  state.item = body;
  state.focused = null;
  loadDraft();
  $("done").hidden = true;
  $("work").hidden = false;
  $("status").textContent = "";
  $("status").className = "";
  renderPrompt();
  render();
  setState("ranking");
}

function renderPrompt() {
  const box = $("prompt");
  box.replaceChildren();
  box.dataset.promptIndex = state.item.prompt_index;
  $("prompt-number").textContent = `#${state.item.prompt_index}`;
  const prompt = state.item.prompt;
  if (typeof prompt === "string") {
    box.textContent = prompt;
    return;
  }
  for (const turn of prompt) {
    const div = document.createElement("div");
    div.className = "turn";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role;
    div.append(role, document.createTextNode(turn.content));
    box.append(div);
  }
}

// ---------------------------------------------------------------------------------------- rendering
function rankedIndices() { return state.ranked.map((entry) => entry.index); }

function poolIndices() {
  const ranked = new Set(rankedIndices());
  return state.item.responses.map((_, i) => i).filter((i) => !ranked.has(i));
}

function tiers() {
  const out = [];
  for (const entry of state.ranked) {
    if (entry.tied && out.length) out[out.length - 1].push(entry.index);
    else out.push([entry.index]);
  }
  return out.map((tier) => tier.sort((a, b) => a - b));
}

function card(index, position) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.index = index;
  li.id = `card-${index}`;
  if (state.focused === index) li.classList.add("focused");
  if (state.unacceptable.has(index)) li.classList.add("unacceptable");
  const head = document.createElement("div");
  head.className = "head";
  const rank = document.createElement("span");
  rank.className = "rank";
  if (position !== null) {
    const entry = state.ranked[position];
    if (entry.tied) li.classList.add("tied");
    rank.textContent = entry.tied ? "=" : `${tiers().findIndex((tier) => tier.includes(index)) + 1}.`;
  }
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = `Response ${index + 1}`;
  const controls = document.createElement("span");
  controls.className = "controls";
  if (position !== null && position > 0 && state.config.allow_ties) {
    controls.append(checkbox("tie", "tied with the one above", state.ranked[position].tied, () => toggleTie(index)));
  }
  controls.append(checkbox("bad", "unacceptable", state.unacceptable.has(index), () => toggleUnacceptable(index)));
  head.append(rank, name, controls);
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = state.item.responses[index];
  li.append(head, text);
  li.addEventListener("mousedown", (event) => startDrag(event, index));
  return li;
}

function checkbox(kind, label, checked, onChange) {
  const wrap = document.createElement("label");
  wrap.className = kind;
  const box = document.createElement("input");
  box.type = "checkbox";
  box.className = kind;
  box.checked = checked;
  box.addEventListener("change", onChange);
  box.addEventListener("mousedown", (event) => event.stopPropagation());
  wrap.addEventListener("mousedown", (event) => event.stopPropagation());
  wrap.append(box, document.createTextNode(` ${label}`));
  return wrap;
}

function render() {
  $("ranked").replaceChildren(...state.ranked.map((entry, position) => card(entry.index, position)));
  $("pool").replaceChildren(...poolIndices().map((index) => card(index, null)));
  const complete = state.ranked.length === state.item.responses.length;
  $("submit").disabled = !complete || state.busy;
  $("ranked").dataset.tiers = JSON.stringify(tiers());
  document.querySelectorAll(".ties-help").forEach((el) => { el.hidden = !state.config.allow_ties; });
}

function changed() {
  saveDraft();
  render();
}

// ---------------------------------------------------------------------------------------- edits
function place(index, position) {
  // put response `index` at `position` of the ranking (counted without it); its tie with the one above is undone
  const from = state.ranked.findIndex((entry) => entry.index === index);
  if (from >= 0) {
    const [entry] = state.ranked.splice(from, 1);
    if (from < state.ranked.length && state.ranked[from].tied && !entry.tied) state.ranked[from].tied = false;
  }
  position = Math.max(0, Math.min(position, state.ranked.length));
  state.ranked.splice(position, 0, {index, tied: false});
  if (state.ranked.length) state.ranked[0].tied = false;
  state.focused = index;
  changed();
}

function unrank(index) {
  const from = state.ranked.findIndex((entry) => entry.index === index);
  if (from < 0) return;
  const [entry] = state.ranked.splice(from, 1);
  if (from < state.ranked.length && state.ranked[from].tied && !entry.tied) state.ranked[from].tied = false;
  if (state.ranked.length) state.ranked[0].tied = false;
  changed();
}

function move(index, step) {
  const from = state.ranked.findIndex((entry) => entry.index === index);
  if (from < 0) return;
  const to = from + step;
  if (to < 0 || to >= state.ranked.length) return;
  [state.ranked[from], state.ranked[to]] = [state.ranked[to], state.ranked[from]];
  state.ranked[from].tied = state.ranked[to].tied = false;
  if (from + 1 < state.ranked.length) state.ranked[from + 1].tied = false;
  if (to + 1 < state.ranked.length) state.ranked[to + 1].tied = false;
  changed();
}

function toggleTie(index) {
  if (!state.config.allow_ties) return;
  const at = state.ranked.findIndex((entry) => entry.index === index);
  if (at <= 0) return;
  state.ranked[at].tied = !state.ranked[at].tied;
  changed();
}

function toggleUnacceptable(index) {
  if (state.unacceptable.has(index)) state.unacceptable.delete(index);
  else state.unacceptable.add(index);
  changed();
}

function focusCard(index) {
  state.focused = index;
  render();
}

// ---------------------------------------------------------------------------------------- drag and drop
let drag = null;

function startDrag(event, index) {
  if (event.button !== 0 || state.busy) return;
  event.preventDefault();
  drag = {index, x: event.clientX, y: event.clientY, moved: false, ghost: null};
  document.addEventListener("mousemove", onDragMove);
  document.addEventListener("mouseup", onDragEnd);
}

function clearMarks() {
  document.querySelectorAll(".insert-before, .insert-after").forEach((el) => el.classList.remove("insert-before", "insert-after"));
  document.querySelectorAll(".drop-here").forEach((el) => el.classList.remove("drop-here"));
}

function inside(el, x, y) {
  const r = el.getBoundingClientRect();
  return x >= r.left && x <= r.right && y >= r.top && y <= r.bottom;
}

function dropTarget(x, y) {
  // {zone: "ranked", position} or {zone: "pool"} or null, from the pointer's position
  const ranked = $("ranked");
  if (inside(ranked, x, y)) {
    const others = [...ranked.children].filter((el) => Number(el.dataset.index) !== drag.index);
    let position = 0;
    for (const el of others) {
      const r = el.getBoundingClientRect();
      if (y > r.top + r.height / 2) position += 1;
    }
    return {zone: "ranked", position, others};
  }
  if (inside($("pool"), x, y)) return {zone: "pool"};
  return null;
}

function onDragMove(event) {
  if (!drag) return;
  if (!drag.moved && Math.hypot(event.clientX - drag.x, event.clientY - drag.y) < 4) return;
  if (!drag.moved) {
    drag.moved = true;
    const source = document.getElementById(`card-${drag.index}`);
    source.classList.add("dragging");
    drag.ghost = source.cloneNode(true);
    drag.ghost.id = "ghost";
    drag.ghost.style.width = `${source.getBoundingClientRect().width}px`;
    document.body.append(drag.ghost);
    setState("dragging");
  }
  drag.ghost.style.left = `${event.clientX + 8}px`;
  drag.ghost.style.top = `${event.clientY + 8}px`;
  clearMarks();
  const target = dropTarget(event.clientX, event.clientY);
  if (!target) return;
  if (target.zone === "pool") { $("pool").classList.add("drop-here"); return; }
  $("ranked").classList.add("drop-here");
  if (target.others.length) {
    if (target.position < target.others.length) target.others[target.position].classList.add("insert-before");
    else target.others[target.others.length - 1].classList.add("insert-after");
  }
}

function onDragEnd(event) {
  document.removeEventListener("mousemove", onDragMove);
  document.removeEventListener("mouseup", onDragEnd);
  if (!drag) return;
  const {index, moved, ghost} = drag;
  const target = moved ? dropTarget(event.clientX, event.clientY) : null;
  if (ghost) ghost.remove();
  drag = null;
  clearMarks();
  if (state.item) setState("ranking");
  if (!moved) { focusCard(index); return; }
  if (!target) { render(); return; }
  if (target.zone === "ranked") place(index, target.position);
  else { unrank(index); state.focused = index; render(); }
}

// ---------------------------------------------------------------------------------------- keyboard
document.addEventListener("keydown", (event) => {
  if (!state.item || document.body.dataset.state !== "ranking") return;
  if (event.target instanceof HTMLInputElement && event.target.type === "text") return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const k = state.item.responses.length;
  if (/^[1-9]$/.test(event.key)) {
    const index = Number(event.key) - 1;
    if (index >= k) return;
    event.preventDefault();
    if (rankedIndices().includes(index)) focusCard(index);
    else place(index, state.ranked.length);
    return;
  }
  const focused = state.focused;
  switch (event.key) {
    case "ArrowUp":
    case "ArrowDown":
      if (focused === null) return;
      event.preventDefault();
      move(focused, event.key === "ArrowUp" ? -1 : 1);
      break;
    case "=":
      if (focused !== null) { event.preventDefault(); toggleTie(focused); }
      break;
    case "u":
    case "U":
      if (focused !== null) { event.preventDefault(); toggleUnacceptable(focused); }
      break;
    case "Backspace":
    case "Delete":
      if (focused !== null) { event.preventDefault(); unrank(focused); }
      break;
    case "Enter":
      event.preventDefault();
      submit();
      break;
    default:
  }
});

// ---------------------------------------------------------------------------------------- submit
async function submit() {
  if (!state.item || state.busy || state.ranked.length !== state.item.responses.length) return;
  state.busy = true;
  render();
  setState("saving");
  $("status").textContent = "saving...";
  const body = {annotator: state.annotator, prompt_index: state.item.prompt_index, ranking: tiers(),
    unacceptable: [...state.unacceptable].sort((a, b) => a - b)};
  try {
    const answer = await api("/api/rank", {method: "POST", body: JSON.stringify(body)});
    localStorage.removeItem(draftKey());
    showProgress(answer.progress);
    state.busy = false;
    await loadNext();
  } catch (e) {
    state.busy = false;
    render();
    setState("ranking");
    $("status").textContent = "";
    showError(`not saved: ${e.message}`);
  }
}

$("submit").addEventListener("click", submit);

// ---------------------------------------------------------------------------------------- start
(async function start() {
  try {
    state.config = await api("/api/config");
  } catch (e) {
    showError(`the server does not answer: ${e.message}`);
    setState("error");
    return;
  }
  $("file").textContent = `${state.config.file} (${state.config.prompts} prompts)`;
  state.annotator = localStorage.getItem(NAME_KEY);
  if (!state.annotator) askName();
  else loadNext();
})();
