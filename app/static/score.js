// The "Score an image" panel: an uploaded or a generated image and 1..32 captions go to
// POST /v1/scores; the job is then read with GET /v1/scores/{id}, backing off, until it
// ends (the event stream follows generations only). Shows each caption's probability as a
// bar, most probable first, its bits/dim, and the surprise heatmap.

import { ApiError, fetchImage, scoreStatus, submitScore, toBase64 } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = { first: 250, max: 2000, factor: 1.6 };
const FINAL = new Set(["succeeded", "failed", "canceled"]);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const percent = (p) => (p >= 0.001 ? `${(p * 100).toFixed(1)} %` : "< 0.1 %");
const bits = (x) => `${x.toFixed(3)} bits/dim`;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function statusText(view) {
  switch (view.status) {
    case "queued":
      return view.queue_position ? `Queued: ${view.queue_position} ahead` : "Queued";
    case "running":
      return "Scoring…";
    case "succeeded":
      return `Done: ${view.results.length} captions ranked`;
    case "failed":
      return `Failed: ${view.error ? view.error.message : "no reason given"}`;
    default:
      return view.status.charAt(0).toUpperCase() + view.status.slice(1);
  }
}

/** One ranked caption: its text, probability (as a bar and in words) and bits/dim. */
function barItem(result) {
  const meter = element("meter");
  meter.min = 0;
  meter.max = 1;
  meter.value = result.probability;
  meter.setAttribute("aria-label", `Probability of “${result.caption}”`);
  const head = element("div", "score-line");
  head.append(element("span", "score-caption", result.caption),
              element("span", "score-percent", percent(result.probability)));
  const tolerant = result.bits_per_dim_tolerant;
  const detail = bits(result.bits_per_dim) +
    (tolerant == null ? "" : ` (${tolerant.toFixed(3)} with outliers tolerated)`);
  const item = element("li");
  item.append(head, meter, element("p", "hint", detail));
  return item;
}

export class ScorePanel {
  /** @param {object} hooks explain(ApiError) → sentence, onAuthNeeded() */
  constructor({ explain, onAuthNeeded }) {
    this.explain = explain;
    this.onAuthNeeded = onAuthNeeded;
    this.source = null; // {image: base64} or {job_id, image_index}
    this.run = 0; // the submission being followed; a newer one stops the older's loop
    this.urls = {}; // object URL per <img> id, revoked when replaced
    this.sending = false;
    $("score-file").addEventListener("change", () => this.useFile());
    $("score-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("captions").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $("score-form").requestSubmit();
      }
    });
  }

  showBlob(imgId, blob) {
    if (this.urls[imgId]) URL.revokeObjectURL(this.urls[imgId]);
    this.urls[imgId] = URL.createObjectURL(blob);
    $(imgId).src = this.urls[imgId];
  }

  showSource(blob, text) {
    this.showBlob("score-image", blob);
    $("score-image").alt = `The image to score: ${text}`;
    $("score-source-text").textContent = text;
    $("score-source").hidden = false;
  }

  async useFile() {
    const file = $("score-file").files[0];
    this.source = null;
    $("score-source").hidden = true;
    if (!file) return;
    this.showSource(file, file.name);
    this.source = { image: await toBase64(file) };
  }

  /** A finished generation's image (a job card's "Score" button): scored by reference. */
  useGenerated({ jobId, index, blob, prompt }) {
    $("score-file").value = "";
    this.source = { job_id: jobId, image_index: index };
    this.showSource(blob, `Image ${index + 1} of “${prompt}”`);
    if (!$("captions").value.trim()) $("captions").value = `${prompt}\n`;
    $("score-title").scrollIntoView({ block: "start" });
    $("captions").focus();
  }

  showError(message, field = null) {
    $("score-error").textContent = message;
    $("score-error").hidden = !message;
    const note = $("captions-error");
    note.textContent = field === "captions" ? message : "";
    note.hidden = field !== "captions";
    if (field === "captions") $("captions").setAttribute("aria-invalid", "true");
    else $("captions").removeAttribute("aria-invalid");
    if (field) $(field === "captions" ? "captions" : "score-file").focus();
  }

  async submit() {
    if (this.sending) return;
    this.showError("");
    const captions = $("captions").value.split("\n").map((c) => c.trim()).filter(Boolean);
    if (!this.source) {
      this.showError("Choose an image file, or press “Score” under a generated image.", "image");
      return;
    }
    if (captions.length === 0) {
      this.showError("Enter at least one caption, one per line.", "captions");
      return;
    }
    const run = ++this.run;
    this.sending = true;
    this.clearResult();
    $("score").setAttribute("aria-busy", "true");
    try {
      const created = await submitScore({ ...this.source, captions });
      this.sending = false;
      await this.follow(created.id, run);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (run !== this.run) return;
      if (error.status === 401) this.onAuthNeeded();
      const field = String(error.field || "").split(".")[0];
      this.showError(this.explain(error), field === "captions" ? "captions" : null);
    } finally {
      this.sending = false;
      $("score").removeAttribute("aria-busy");
    }
  }

  clearResult() {
    $("score-status").textContent = "Sending…";
    $("score-bars").replaceChildren();
    $("score-bpd").textContent = "";
    $("surprise").hidden = true;
    $("score-result").hidden = false;
  }

  /** Read the job until it ends, waiting a little longer after each answer. */
  async follow(id, run) {
    let delay = POLL_MS.first;
    for (;;) {
      const view = await scoreStatus(id);
      if (run !== this.run) return;
      $("score-status").textContent = statusText(view);
      if (FINAL.has(view.status)) {
        if (view.status === "succeeded") await this.showResults(view);
        return;
      }
      await sleep(delay);
      delay = Math.min(POLL_MS.max, delay * POLL_MS.factor);
    }
  }

  async showResults(view) {
    $("score-bars").replaceChildren(...view.ranking.map((n) => barItem(view.results[n])));
    $("score-bpd").textContent = `Without a caption: ${bits(view.unconditional_bits_per_dim)}.` +
      (view.resized ? " The image was resized and centre-cropped to the model's size." : "");
    if (!view.surprise_url) return;
    this.showBlob("surprise-image", await fetchImage(view.surprise_url));
    const best = view.results[view.ranking[0]].caption;
    $("surprise-image").alt = `Surprise heatmap of the image under “${best}”`;
    $("surprise").hidden = false;
  }
}
