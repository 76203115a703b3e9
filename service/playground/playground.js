// UniGuard playground: builds a /classify request from the form, sends it to the public API, renders the answer.
// No framework, no build step; every text from the user or the server is inserted as text, never as HTML. URLs are
// relative to the page, so the page also works behind a reverse proxy that serves the API under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const PROPERTIES = new Set(["checked", "value", "htmlFor", "disabled"]);
const GROUP_TITLES = { defaults: "Defaults", categories: "Categories", custom: "Custom" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (PROPERTIES.has(key)) node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function authRequired() {
  const meta = document.querySelector('meta[name="uniguard-auth"]');
  return meta !== null && meta.content === "required";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// --- policies ------------------------------------------------------------------------------------------------------

async function loadPolicies() {
  const box = $("policies");
  let response;
  try {
    response = await fetch("policies", { headers: headers(false) });
  } catch (err) {
    box.replaceChildren(el("p", { class: "bad", text: "cannot reach the service: " + err }));
    return;
  }
  const body = await readBody(response);
  if (!response.ok) {
    box.replaceChildren(el("p", { class: "muted", text: "the policy list could not be loaded:" }));
    showError(response, body);
    return;
  }
  hideError();
  const byName = new Map(body.policies.map((p) => [p.name, p]));
  const groups = body.groups && Object.keys(body.groups).length ? body.groups : { custom: [...byName.keys()] };
  box.replaceChildren();
  for (const [group, names] of Object.entries(groups)) {
    const all = el("input", { type: "checkbox", class: "group-box", "data-group": group });
    const toggle = el("button", { type: "button", class: "toggle", "data-group": group, text: "hide" });
    const legend = el("legend", {}, el("label", {}, all, " " + (GROUP_TITLES[group] || group) + " "),
      el("span", { class: "muted", text: `${names.length} · request name "${group}" ` }), toggle);
    const list = el("div", { class: "policy-list" });
    for (const name of names) list.append(policyRow(byName.get(name)));
    const fieldset = el("fieldset", { class: "group", "data-group": group }, legend, list);
    const collapse = (collapsed) => {
      fieldset.classList.toggle("collapsed", collapsed);
      toggle.textContent = collapsed ? "show" : "hide";
    };
    all.addEventListener("change", () => {
      for (const box of fieldset.querySelectorAll("input.policy")) box.checked = all.checked;
      if (all.checked) collapse(false);
    });
    toggle.addEventListener("click", () => collapse(!fieldset.classList.contains("collapsed")));
    collapse(![...fieldset.querySelectorAll("input.policy")].some((b) => b.checked));
    box.append(fieldset);
    syncGroupBox(fieldset);
    fieldset.addEventListener("change", () => syncGroupBox(fieldset));
  }
}

function syncGroupBox(fieldset) {
  const boxes = [...fieldset.querySelectorAll("input.policy")];
  const all = fieldset.querySelector("legend input");
  all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
  all.indeterminate = !all.checked && boxes.some((b) => b.checked);
}

function policyRow(policy) {
  const check = el("input", { type: "checkbox", class: "policy", value: policy.name, checked: policy.enabled_by_default,
    id: "policy-" + policy.name });
  const threshold = el("input", { class: "threshold", inputmode: "decimal", placeholder: policy.threshold.toFixed(2),
    title: "threshold override for " + policy.name, "data-policy": policy.name });
  const label = el("label", { htmlFor: "policy-" + policy.name }, el("b", { text: policy.name }),
    policy.known_to_model ? null : el("span", { class: "tag", text: "zero-shot", title: "the model never saw this exact policy text" }));
  return el("div", { class: "policy-row", "data-policy": policy.name }, check,
    el("div", { class: "policy-text" }, label, el("div", { class: "muted small", text: policy.description })),
    threshold);
}

// --- the request ---------------------------------------------------------------------------------------------------

function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

// A threshold field goes to the API as a number when it parses as one, otherwise as typed: the API judges it.
function thresholdValue(raw) {
  const value = raw.trim();
  if (value === "") return undefined;
  const number = Number(value);
  return Number.isFinite(number) ? number : value;
}

function buildRequest() {
  const text = $("prompts").value;
  const input = $("per-line").checked ? lines(text) : text;
  const policies = [...document.querySelectorAll("input.policy:checked")].map((b) => b.value);
  const thresholds = {};
  for (const field of document.querySelectorAll("input.threshold")) {
    const value = thresholdValue(field.value);
    if (value !== undefined && policies.includes(field.dataset.policy)) thresholds[field.dataset.policy] = value;
  }
  const request = { input, policies };
  if ($("inline-on").checked) {
    const inline = {
      name: $("inline-name").value.trim(),
      description: $("inline-description").value.trim(),
      disallowed: lines($("inline-disallowed").value),
      allowed: lines($("inline-allowed").value),
    };
    const reply = $("inline-response").value.trim();
    if (reply) inline.response = reply;
    const threshold = thresholdValue($("inline-threshold").value);
    if (threshold !== undefined) inline.threshold = threshold;
    request.custom_policies = [inline];
  }
  if (Object.keys(thresholds).length) request.thresholds = thresholds;
  if ($("categories-on").checked) request.categories = true;
  return request;
}

async function readBody(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

let answered = 0;

async function classify() {
  const request = buildRequest();
  $("request-json").textContent = JSON.stringify(request, null, 2);
  $("status").textContent = "classifying…";
  $("classify").disabled = true;
  const started = performance.now();
  try {
    const response = await fetch("classify", { method: "POST", headers: headers(true), body: JSON.stringify(request) });
    const body = await readBody(response);
    const roundTrip = performance.now() - started;
    if (!response.ok) {
      $("results").replaceChildren();
      $("summary").textContent = "";
      showError(response, body);
      $("status").textContent = `HTTP ${response.status} in ${roundTrip.toFixed(0)} ms`;
      return;
    }
    hideError();
    renderResults(request, body, roundTrip);
    $("status").textContent = "";
  } catch (err) {
    $("status").textContent = "request failed: " + err;
  } finally {
    $("classify").disabled = false;
    answered += 1;
    $("output").dataset.answered = String(answered);  // lets a test (or a person) tell answers apart
  }
}

// --- the answer ----------------------------------------------------------------------------------------------------

function showError(response, body) {
  $("error").hidden = false;
  $("error-status").textContent = `HTTP ${response.status} ${response.statusText}`.trim();
  $("error-body").textContent = typeof body === "string" ? body : JSON.stringify(body, null, 2);
}

function hideError() {
  $("error").hidden = true;
}

function scoreBar(verdict) {
  const score = verdict.score === null ? 0 : verdict.score;
  const fill = el("div", { class: "fill " + verdict.verdict });
  fill.style.width = (100 * score).toFixed(1) + "%";
  const mark = el("div", { class: "mark", title: "threshold " + verdict.threshold });
  mark.style.left = (100 * verdict.threshold).toFixed(1) + "%";
  return el("div", { class: "bar", title: `score ${score.toFixed(3)} / threshold ${verdict.threshold.toFixed(3)}` },
    fill, mark);
}

function renderResults(request, body, roundTrip) {
  const texts = Array.isArray(request.input) ? request.input : [request.input];
  $("summary").replaceChildren(
    el("span", { id: "latency", text: `${body.latency_ms.toFixed(1)} ms in the service` }),
    ` · ${roundTrip.toFixed(0)} ms round trip · ${body.usage.texts} text(s) × ${body.usage.policies} ` +
      `polic${body.usage.policies === 1 ? "y" : "ies"} · ${body.usage.tokens} tokens · ${body.model}` +
      (body.degraded ? ` · DEGRADED (${body.degraded_reason})` : ""));
  const cards = body.results.map((result, i) => {
    const text = texts[i] || "";
    const rows = Object.entries(result.policies).map(([name, v]) => {
      const extra = [];
      if (v.span) {
        const span = text.slice(v.span.start, v.span.end);
        extra.push(el("div", { class: "span small" }, `chars ${v.span.start}–${v.span.end}: `,
          el("mark", { text: span.length > 240 ? span.slice(0, 240) + "…" : span })));
      }
      if (v.categories) {
        extra.push(el("div", { class: "categories small", "data-policy": name },
          v.categories.length ? "categories: " + v.categories.join(", ") : "categories: none over threshold"));
      }
      return el("tr", { class: "verdict-row", "data-policy": name },
        el("td", {}, el("b", { text: name }), ...extra),
        el("td", {}, el("span", { class: "verdict " + v.verdict, "data-policy": name, text: v.verdict })),
        el("td", { class: "score-cell" }, scoreBar(v)),
        el("td", { class: "num", text: v.score === null ? "–" : v.score.toFixed(3) }),
        el("td", { class: "num muted", text: v.threshold.toFixed(2) }),
        el("td", { class: "muted small", text: v.cached ? "cached" : "" }));
    });
    const head = el("tr", {}, ...["policy", "verdict", "score vs threshold", "score", "thr.", ""].map(
      (h) => el("th", { text: h })));
    return el("article", { class: "result " + (result.flagged ? "flagged" : "ok"), "data-index": String(i),
      "data-flagged": String(result.flagged) },
      el("div", { class: "prompt" }, el("span", { class: "badge " + (result.flagged ? "unsafe" : "safe"),
        text: result.flagged ? "flagged" : "passed" }), " ",
        el("span", { class: "prompt-text", text: text.length > 400 ? text.slice(0, 400) + "…" : text })),
      result.response ? el("div", { class: "reply" }, el("span", { class: "muted", text: "safe reply: " }),
        el("span", { class: "reply-text", text: result.response })) : null,
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
  });
  $("results").replaceChildren(...cards);
}

async function loadModel() {
  try {
    const response = await fetch("version", { headers: headers(false) });
    if (response.ok) {
      const v = await response.json();
      $("model").textContent = `model: ${v.model || "not loaded"} · service ${v.service}`;
      return;
    }
  } catch {
    /* shown below */
  }
  $("model").textContent = "";
}

document.addEventListener("DOMContentLoaded", () => {
  $("classify").addEventListener("click", classify);
  $("prompts").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) classify();
  });
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    loadPolicies();
    loadModel();
  });
  if (authRequired()) {
    $("auth").hidden = false;
    $("policies").replaceChildren(el("p", { class: "muted", text: "enter an API key, then load the policies" }));
  } else {
    loadPolicies();
  }
  loadModel();
});
