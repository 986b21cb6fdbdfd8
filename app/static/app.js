// The promptpix page: wires the form, the model list, readiness, the job list and the
// Score panel together.

import { ApiError, getApiKey, listModels, readiness, setApiKey, submitJob } from "./api.js";
import {
  clearFieldErrors,
  FieldError,
  fieldFromPath,
  fillForm,
  labelOf,
  randomSeed,
  readForm,
  showFieldError,
} from "./form.js";
import { JobList } from "./jobs.js";
import { ScorePanel } from "./score.js";

const $ = (id) => document.getElementById(id);
const READY_POLL_MS = { ready: 15000, notReady: 3000 };
const MAX_EXAMPLES = 8;

let jobs;
let readyTimer = null;
let wasReady = null;
let waitUntil = 0; // after a 429 or 503, no submitting before this time (ms)
let sending = false;

// ---- messages -------------------------------------------------------------------------

function showFormError(message) {
  const box = $("form-error");
  box.textContent = message;
  box.hidden = !message;
}

function clearErrors() {
  clearFieldErrors();
  showFormError("");
}

/** The server's message as a sentence, so more can follow it. */
function sentence(text) {
  const trimmed = String(text || "").trim();
  return /[.!?]$/.test(trimmed) ? trimmed : `${trimmed}.`;
}

/** A sentence a person can act on, for any ApiError. */
function explain(error) {
  switch (error.status) {
    case 0:
      return "The server cannot be reached. Check that it is running, then try again.";
    case 401:
      return getApiKey()
        ? "The server did not accept this API key. Check it under “API key”."
        : "This server needs an API key. Enter it under “API key”, then try again.";
    case 422: {
      const field = fieldFromPath(error.field);
      if (field) return `${labelOf(field)}: ${sentence(error.message)}`;
      return error.field ? `${error.field}: ${sentence(error.message)}` : sentence(error.message);
    }
    case 429:
      return error.code === "queue_full"
        ? `The queue is full. ${sentence(error.message)}`
        : `Too many requests. ${sentence(error.message)}`;
    case 503:
      return `The service is unavailable. ${sentence(error.message)}`;
    default:
      return sentence(error.message);
  }
}

function askForKey({ focus }) {
  $("key-panel").open = true;
  if (focus) $("api-key").focus();
}

// ---- waiting out a Retry-After --------------------------------------------------------

/** Keep the Generate button unusable (but focusable) until the server's wait is over. */
function waitBeforeRetry(seconds) {
  const button = $("generate");
  waitUntil = Date.now() + seconds * 1000;
  button.setAttribute("aria-disabled", "true");
  const tick = () => {
    const left = Math.ceil((waitUntil - Date.now()) / 1000);
    if (left > 0) {
      button.textContent = `Wait ${left} s`;
      setTimeout(tick, 1000);
    } else {
      button.textContent = "Generate";
      button.removeAttribute("aria-disabled");
    }
  };
  tick();
}

const waiting = () => Date.now() < waitUntil;

// ---- submitting -----------------------------------------------------------------------

function handleSubmitError(error) {
  if (!(error instanceof ApiError)) throw error;
  let message = explain(error);
  if (error.status === 422) {
    const field = fieldFromPath(error.field);
    if (field) {
      showFieldError(field, error.message);
      $(field).focus();
    }
  }
  if (error.status === 401) askForKey({ focus: true });
  if (error.status === 503) checkReadiness();
  if ((error.status === 429 || error.status === 503) && error.retryAfter) {
    message += ` Try again in ${error.retryAfter} s.`;
    waitBeforeRetry(error.retryAfter);
  }
  showFormError(message);
}

/** Submit a generation and add its card; `showError` says why it was refused. */
async function send(params, showError = handleSubmitError) {
  if (sending || waiting()) return;
  sending = true;
  $("generate").setAttribute("aria-busy", "true");
  try {
    const created = await submitJob(params);
    const { init_image: _, ...kept } = params; // not the upload in localStorage
    const job = jobs.add({
      id: created.id,
      prompt: params.prompt,
      params: { ...kept, seed: created.seed ?? params.seed },
      created_at: created.created_at,
      status: created.status || "queued",
    });
    // On a phone the job list is below the form: bring the new card into view.
    job.card.scrollIntoView({ block: "nearest" });
  } catch (error) {
    showError(error);
  } finally {
    sending = false;
    $("generate").removeAttribute("aria-busy");
  }
}

function onSubmit(event) {
  event.preventDefault();
  if (waiting()) return;
  clearErrors();
  let params;
  try {
    params = readForm();
  } catch (error) {
    if (!(error instanceof FieldError)) throw error;
    showFieldError(error.field, error.message);
    showFormError(`${labelOf(error.field)}: ${error.message}`);
    $(error.field).focus();
    return;
  }
  send(params);
}

/** "Same seed again" / "New seed": show the parameters in the form and submit them. */
function rerun(params, { newSeed }) {
  const next = newSeed ? { ...params, seed: randomSeed() } : params;
  fillForm(next);
  clearErrors();
  send(next);
}

/** "Continue from row N" on a job's image: a refusal is shown in that job's card. */
function continueFrom(params, source) {
  return send(params, (error) => {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 401) askForKey({ focus: false });
    source.renderError({ message: explain(error), code: error.code });
  });
}

// ---- models and readiness -------------------------------------------------------------

function describeModel(model) {
  const parts = [`Model ${String(model.id || "?")}`];
  if (model.image_size) parts.push(`${model.image_size}×${model.image_size}`);
  if (model.dataset) parts.push(String(model.dataset));
  const bpd = model.val_bpd ?? model.validation_bpd;
  if (typeof bpd === "number") parts.push(`${bpd.toPrecision(3)} bits/dim`);
  return parts.join(" · ");
}

function showExamples(models) {
  const all = models.flatMap((m) => m.example_prompts || []);
  const prompts = [...new Set(all)].slice(0, MAX_EXAMPLES);
  const list = $("example-list");
  list.replaceChildren(
    ...prompts.map((text) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "chip";
      button.textContent = text;
      button.addEventListener("click", () => {
        $("prompt").value = text;
        $("prompt").focus();
      });
      const item = document.createElement("li");
      item.append(button);
      return item;
    }),
  );
  $("examples").hidden = prompts.length === 0;
}

let servedModels = [];

/** The picked model's facts, examples and default guidance (the first when none is picked). */
function showPickedModel() {
  const picked = servedModels.find((m) => m.id === $("model").value) || servedModels[0];
  if (!picked) return;
  $("model-info").textContent = describeModel(picked) +
    (picked.workers === 0 ? " (no worker running: jobs wait for one)" : "");
  const guidance = picked.default_guidance_scale;
  $("guidance_scale").placeholder = guidance == null ? "model default" : `default: ${guidance}`;
  showExamples([picked]);
}

function showModels(models) {
  servedModels = models;
  if (models.length === 0) {
    $("model-info").textContent = "No model is being served yet.";
    $("model-field").hidden = true;
    return;
  }
  const picker = $("model");
  const before = picker.value;
  picker.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = String(m.id);
    option.textContent = m.workers === 0 ? `${m.id} (no worker yet)` : String(m.id);
    return option;
  }));
  if (models.some((m) => m.id === before)) picker.value = before;
  $("model-field").hidden = models.length < 2;
  showPickedModel();
}

async function loadModels() {
  try {
    showModels(await listModels());
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 401) {
      askForKey({ focus: false });
      showFormError(explain(error));
    } else {
      $("model-info").textContent = `The model list is unavailable: ${error.message}`;
    }
  }
}

/** Poll /readyz and show a banner while no worker can take jobs. */
async function checkReadiness() {
  clearTimeout(readyTimer);
  const { reachable, ready, reason } = await readiness();
  const banner = $("ready-banner");
  banner.hidden = ready;
  if (!reachable) {
    banner.textContent = "The server cannot be reached. Trying again…";
  } else if (!ready) {
    banner.textContent =
      `The service is not ready: ${reason}. Jobs you submit wait in the queue until it is.`;
  }
  if (ready && wasReady === false) loadModels(); // a worker came up and published its model
  wasReady = ready;
  readyTimer = setTimeout(checkReadiness, ready ? READY_POLL_MS.ready : READY_POLL_MS.notReady);
}

// ---- wiring ---------------------------------------------------------------------------

function saveKey() {
  const key = $("api-key").value.trim();
  setApiKey(key);
  $("key-status").textContent = key ? "Key saved in this browser." : "Key removed.";
  clearErrors();
  loadModels();
  jobs.resume();
}

function bindEvents() {
  $("model").addEventListener("change", showPickedModel);
  $("generate-form").addEventListener("submit", onSubmit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });
  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(randomSeed());
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey();
  });
  $("clear-history").addEventListener("click", () => jobs.clearFinished());
}

function init() {
  const onAuthNeeded = () => askForKey({ focus: false });
  const scores = new ScorePanel({ explain, onAuthNeeded });
  jobs = new JobList($("job-list"), $("jobs-empty"), {
    onRerun: rerun,
    onAuthNeeded,
    onScore: (image) => scores.useGenerated(image),
    onContinue: continueFrom,
  });
  $("api-key").value = getApiKey();
  bindEvents();
  jobs.restore();
  jobs.save(); // shows or hides the "no jobs yet" line
  loadModels();
  checkReadiness();
}

init();
