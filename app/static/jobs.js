// One card per job: follows its live events (events.js: one stream for all the page's
// jobs), shows status, progress, the live preview, then the final PNGs (each can be
// scored, or continued from a row); keeps this browser's recent jobs in localStorage.

import { cancelJob, fetchImage, jobStatus, toBase64 } from "./api.js";
import { EventFeed } from "./events.js";
import { PARAM_FIELDS } from "./form.js";

const HISTORY_KEY = "promptpix.jobs";
const HISTORY_LIMIT = 20;
const FINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
// The preview (a request of its own) is fetched at most once a second per job and only when
// the progress moved: with api.js's request budget, a page following many jobs stays well
// under the server's rate limit.
const PREVIEW_MIN_MS = 1000;
const DISPLAY_PX = 128; // images are enlarged by a whole factor to about this many pixels

/** The whole factor that brings `size` pixels nearest DISPLAY_PX without going over. */
function scaleFor(size) {
  return Math.max(1, Math.floor(DISPLAY_PX / Math.max(1, size)));
}

/** Enlarge an <img> by a whole factor once it has loaded (pixelated in CSS). */
function enlarge(img) {
  img.style.width = `${img.naturalWidth * scaleFor(img.naturalHeight)}px`;
}

/**
 * Draw the preview strip (all images of the job side by side) on `canvas` as a grid of
 * tiles that fits `box`, one pixel apart, enlarged like the final images will be.
 */
function drawPreview(canvas, strip, box) {
  const size = strip.height;
  const count = Math.max(1, Math.round(strip.width / size));
  const scale = scaleFor(size);
  const pitch = size + 1; // natural pixels from one tile to the next
  const fit = Math.floor((box.clientWidth / scale + 1) / pitch);
  const cols = Math.max(1, Math.min(count, fit));
  canvas.width = cols * pitch - 1;
  canvas.height = Math.ceil(count / cols) * pitch - 1;
  canvas.style.width = `${canvas.width * scale}px`;
  const ctx = canvas.getContext("2d");
  for (let i = 0; i < count; i++) {
    const x = (i % cols) * pitch;
    const y = Math.floor(i / cols) * pitch;
    ctx.drawImage(strip, i * size, 0, size, size, x, y, size, size);
  }
}

function loadHistory() {
  try {
    const saved = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(saved) ? saved.filter((r) => r && typeof r.id === "string") : [];
  } catch {
    return []; // a damaged entry must not stop the page
  }
}

const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;

function statusText(data) {
  const retry = data.attempt > 1 ? ` (retry, attempt ${data.attempt})` : "";
  switch (data.status) {
    case "queued":
      if (data.queue_position == null) return `Queued${retry}`;
      if (data.queue_position === 0) return `Queued: next in line${retry}`;
      return `Queued: ${plural(data.queue_position, "job")} ahead${retry}`;
    case "running":
      return `Sampling: ${Math.round((data.progress || 0) * 100)}%${retry}`;
    case "succeeded":
      return `Done: ${plural(data.images.length, "image")}`;
    case "failed":
      return "Failed";
    case "canceled":
      return "Canceled";
    case "expired":
      return "Expired: the server no longer keeps this job";
    default:
      return data.status;
  }
}

/** A job's request body again, from the parameters the server reports it ran with. */
function rerunParams(record) {
  const params = { prompt: record.prompt };
  for (const name of PARAM_FIELDS) if (name in record.params) params[name] = record.params[name];
  if (Number.isInteger(record.params.class_label)) params.class_label = record.params.class_label;
  if (typeof record.params.model === "string") params.model = record.params.model;
  return params;
}

class Job {
  /**
   * @param {object} record what is kept in localStorage: id, prompt, params, created_at, status
   * @param {object} hooks onChange(job), onRerun(params, {newSeed}), onRemove(job),
   *   onAuthNeeded(), onScore({jobId, index, blob, prompt}), onContinue(params, job)
   */
  constructor(record, hooks) {
    this.record = record;
    this.hooks = hooks;
    this.removed = false;
    this.previewProgress = null; // progress of the preview on screen
    this.previewAt = 0; // when it was last fetched (performance.now())
    this.imagesShown = false;
    this.imageUrls = [];
    this.blobs = []; // the final PNGs, for scoring and continuing
    this.card = this.build();
  }

  get id() {
    return this.record.id;
  }

  get final() {
    return FINAL.has(this.record.status);
  }

  /** Nothing more to fetch: final, and its images on screen if it succeeded. */
  get done() {
    return this.final && (this.record.status !== "succeeded" || this.imagesShown);
  }

  build() {
    const template = document.getElementById("job-template");
    const node = template.content.firstElementChild.cloneNode(true);
    const part = (name) => node.querySelector(`.${name}`);
    this.el = {
      node,
      status: part("job-status"),
      progress: part("job-progress"),
      preview: part("job-preview"),
      previewCanvas: part("preview-canvas"),
      images: part("job-images"),
      error: part("job-error"),
      cancel: part("cancel"),
      sameSeed: part("same-seed"),
      newSeed: part("new-seed"),
      remove: part("remove"),
      meta: part("job-meta"),
      continueForm: part("continue-form"),
      continueImage: part("continue-image"),
      continueRows: part("continue-rows"),
      continueButton: part("continue"),
    };
    node.dataset.jobId = this.id;
    const title = part("job-prompt");
    title.id = `job-${this.id}-title`;
    title.textContent = this.record.prompt;
    part("job-card").setAttribute("aria-labelledby", title.id);
    this.el.progress.setAttribute("aria-label", "Progress");
    this.el.previewCanvas.setAttribute(
      "aria-label",
      `Preview of the rows sampled so far for: ${this.record.prompt}`,
    );
    const rerun = (newSeed) => this.hooks.onRerun(rerunParams(this.record), { newSeed });
    this.el.cancel.addEventListener("click", () => this.cancel());
    this.el.sameSeed.addEventListener("click", () => rerun(false));
    this.el.newSeed.addEventListener("click", () => rerun(true));
    this.el.remove.addEventListener("click", () => this.hooks.onRemove(this));
    this.el.continueForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.continueImage();
    });
    this.el.continueRows.addEventListener("input", () => this.labelContinue());
    this.render({ status: this.record.status, images: [] });
    return node;
  }

  renderMeta() {
    const { params, created_at: createdAt } = this.record;
    const parts = [];
    if (params.seed != null) parts.push(`seed ${params.seed}`);
    if (params.num_images != null) parts.push(plural(params.num_images, "image"));
    if (params.keep_rows != null) parts.push(`continued from row ${params.keep_rows}`);
    if (createdAt) parts.push(new Date(createdAt).toLocaleTimeString());
    this.el.meta.textContent = parts.join(" · ");
  }

  render(data) {
    const { status } = data;
    this.el.node.dataset.status = status;
    this.el.status.textContent = statusText(data);
    this.renderProgress(data);
    const active = status === "queued" || status === "running";
    this.el.cancel.hidden = !active;
    // The parameters are kept here, even once expired (not a continuation's init image).
    const continued = this.record.params.keep_rows != null;
    this.el.sameSeed.hidden = active || continued;
    this.el.newSeed.hidden = active || continued;
    this.el.remove.hidden = active;
    this.renderError(data.error);
    this.renderMeta();
  }

  renderProgress({ status, progress }) {
    const bar = this.el.progress;
    if (status === "queued") {
      bar.removeAttribute("value"); // indeterminate while waiting
    } else if (status === "running") {
      bar.value = progress || 0;
    } else if (status === "succeeded") {
      bar.value = 1;
    }
    bar.hidden = !(status === "queued" || status === "running" || status === "succeeded");
  }

  renderError(error) {
    this.el.error.hidden = !error;
    this.el.error.textContent = error ? `${error.message} (${error.code})` : "";
  }

  setStatus(status) {
    if (this.record.status === status) return;
    this.record.status = status;
    this.hooks.onChange(this);
  }

  /** Apply one GET /v1/generations/{id} answer. */
  async apply(data) {
    // An answer that left the server before a cancel's must not bring the job back.
    if (this.final && !FINAL.has(data.status)) return;
    // Events and a GET may cross: progress never goes back within one attempt.
    const attempt = data.attempt ?? this.attempt;
    if (attempt !== this.attempt) {
      this.attempt = attempt;
      this.progressSeen = 0;
    }
    if (data.status === "running") {
      data = { ...data, progress: Math.max(data.progress || 0, this.progressSeen || 0) };
      this.progressSeen = data.progress;
    }
    if (data.params) this.record.params = { ...this.record.params, ...data.params };
    this.setStatus(data.status);
    this.render(data);
    const previewDue = data.progress > 0 && data.progress !== this.previewProgress
      && performance.now() - this.previewAt >= PREVIEW_MIN_MS;
    if (data.status === "running" && data.preview_url && previewDue) {
      await this.refreshPreview(data);
    }
    if (data.status === "succeeded" && !this.imagesShown) await this.showImages(data.images);
    // A canceled or failed job keeps its last preview: it shows how far it got.
    if (data.status === "succeeded") this.el.preview.hidden = true;
  }

  /** The preview is a nicety: a failed fetch is retried at the next progress event, not reported. */
  async refreshPreview(data) {
    this.previewAt = performance.now();
    let strip;
    try {
      strip = await createImageBitmap(await fetchImage(data.preview_url, { bust: true }));
    } catch {
      return;
    }
    if (!this.imagesShown) {
      // (unless the job finished while the preview was on its way)
      this.previewProgress = data.progress;
      this.el.preview.hidden = false;
      drawPreview(this.el.previewCanvas, strip, this.el.preview);
      this.el.previewCanvas.dataset.progress = String(data.progress);
    }
    strip.close();
  }

  async showImages(urls) {
    const blobs = await Promise.all(urls.map((url) => fetchImage(url)));
    this.imagesShown = true;
    this.blobs = blobs;
    this.el.images.replaceChildren(...blobs.map((blob, n) => this.imageItem(blob, n)));
    if (blobs.length) await this.offerContinue(blobs[0]);
  }

  /** "Continue from row N": N from 1 to the image height − 1 (half of it at first). */
  async offerContinue(blob) {
    const bitmap = await createImageBitmap(blob);
    this.height = bitmap.height;
    bitmap.close();
    const picker = this.el.continueImage;
    picker.replaceChildren(...this.blobs.map((_, n) => new Option(`Image ${n + 1}`, String(n))));
    const rows = this.el.continueRows;
    rows.max = String(this.height - 1);
    rows.value = String(Math.max(1, Math.floor(this.height / 2)));
    this.labelContinue();
    this.el.continueForm.hidden = this.height < 2;
  }

  labelContinue() {
    const rows = this.el.continueRows.value.trim();
    this.el.continueButton.textContent = rows ? `Continue from row ${rows}` : "Continue";
  }

  /** Submit the picked image's top rows with this job's prompt and settings, a new seed. */
  async continueImage() {
    const rows = this.el.continueRows;
    const keep = Number(rows.value);
    if (!Number.isInteger(keep) || keep < 1 || keep >= this.height) {
      rows.setAttribute("aria-invalid", "true");
      this.renderError({ message: `Rows to keep: enter a whole number from 1 to ${this.height - 1}`,
                         code: "invalid_request" });
      rows.focus();
      return;
    }
    rows.removeAttribute("aria-invalid");
    this.renderError(null);
    const params = rerunParams(this.record);
    delete params.seed; // the server draws one: another continuation than this image's
    const blob = this.blobs[Number(this.el.continueImage.value)];
    params.init_image = await toBase64(blob);
    params.keep_rows = keep;
    await this.hooks.onContinue(params, this);
  }

  imageItem(blob, n) {
    const url = URL.createObjectURL(blob);
    this.imageUrls.push(url);
    const img = document.createElement("img");
    img.className = "pixelated";
    img.alt = `Image ${n + 1} for: ${this.record.prompt}`;
    img.addEventListener("load", () => enlarge(img));
    img.src = url;
    const link = document.createElement("a");
    link.href = url;
    link.download = `promptpix-${this.id.slice(0, 8)}-${n}.png`;
    link.textContent = `Download image ${n + 1}`;
    const score = document.createElement("button");
    score.type = "button";
    score.className = "secondary small";
    score.textContent = "Score";
    score.setAttribute("aria-label", `Score image ${n + 1}`);
    score.addEventListener("click", () => this.hooks.onScore({
      jobId: this.id, index: n, blob, prompt: this.record.prompt }));
    const caption = document.createElement("figcaption");
    caption.append(link, score);
    const figure = document.createElement("figure");
    figure.append(img, caption);
    const item = document.createElement("li");
    item.append(figure);
    return item;
  }

  /** One GET of the job (when its event stream cannot say): a 404 means it expired. */
  async refreshOnce() {
    try {
      await this.apply(await jobStatus(this.id));
    } catch (error) {
      if (error.status === 404) {
        this.setStatus("expired");
        this.render({ status: "expired", images: [] });
      } else {
        this.showUpdateFailed(error);
      }
    }
  }

  /** Say in the card that following the job failed (the feed tries again). */
  showUpdateFailed(error) {
    if (this.done) return;
    const last = statusText({ status: this.record.status, images: [] });
    this.el.status.textContent = `${last} (update failed: ${error.message})`;
  }

  async cancel() {
    this.el.cancel.disabled = true;
    try {
      await this.apply(await cancelJob(this.id));
    } catch (error) {
      // 409 not_cancelable: it finished first; its events show how.
      this.renderError({ message: error.message, code: error.code });
      this.refreshOnce();
    } finally {
      this.el.cancel.disabled = false;
    }
  }

  dispose() {
    this.removed = true;
    for (const url of this.imageUrls) URL.revokeObjectURL(url);
    this.el.node.remove();
  }
}

/** The list of this browser's jobs, newest first, mirrored to localStorage. */
export class JobList {
  constructor(listEl, emptyEl, { onRerun, onAuthNeeded, onScore, onContinue }) {
    this.listEl = listEl;
    this.emptyEl = emptyEl;
    this.jobs = [];
    this.hooks = {
      onChange: () => this.save(),
      onRerun,
      onAuthNeeded,
      onScore,
      onContinue,
      onRemove: (job) => this.remove(job),
    };
    this.feed = new EventFeed(() => this.jobs.filter((j) => !j.done && !j.removed));
  }

  restore() {
    for (const record of loadHistory().reverse()) this.add(record);
  }

  /** Add a job (newest first) and start following it. */
  add(record) {
    const job = new Job({ params: {}, ...record }, this.hooks);
    this.jobs.unshift(job);
    this.listEl.prepend(job.card);
    for (const old of this.jobs.slice(HISTORY_LIMIT)) this.remove(old);
    this.save();
    if (job.record.status !== "expired") this.feed.refresh();
    return job;
  }

  remove(job) {
    job.dispose();
    this.jobs = this.jobs.filter((j) => j !== job);
    this.save();
    this.feed.refresh();
  }

  clearFinished() {
    for (const job of this.jobs.filter((j) => j.final)) this.remove(job);
  }

  /** Follow again the jobs that stopped on an error (after a new API key, say). */
  resume() {
    this.feed.restart(true);
  }

  save() {
    this.emptyEl.hidden = this.jobs.length > 0;
    const records = this.jobs.slice(0, HISTORY_LIMIT).map((job) => job.record);
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(records));
    } catch {
      // Storage full or disabled: the history is a convenience, the page works without it.
    }
  }
}
