// Live job events for the page: one fetch-streamed GET /v1/events?ids=... for every job
// still running or queued (EventSource cannot send the API key). A job's events update its
// card; the final `done` event carries the job view with its images. When the set of
// followed jobs changes, the stream is opened again for the new set.

import { openEvents } from "./api.js";

const RESTART_DEBOUNCE_MS = 150; // jobs added together share one new stream
const RETRY_MS = 2000; // after a stream that failed without a Retry-After
const QUEUED_LOOKUP_MS = 300; // a job still queued this long after its event: GET its place

/** Split a text/event-stream body into {event, data, id} records as they arrive. */
async function* sseRecords(body, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (!signal.aborted) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const record = { event: "message", data: "", id: null };
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (name === "event") record.event = text;
          else if (name === "data") data.push(text);
          else if (name === "id") record.id = text;
        }
        record.data = data.join("\n");
        if (data.length) yield record;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

const FINAL = new Set(["succeeded", "failed", "canceled"]);

/** A partial job view from a `status` or `progress` event, for Job.apply (null for a final
 * status: the `done` event that follows it carries the whole view, images included). */
function viewFromEvent(kind, data) {
  if (kind === "progress") {
    return {
      status: "running",
      progress: data.progress,
      images: [],
      preview_url: `/v1/generations/${encodeURIComponent(data.job)}/preview.png`,
    };
  }
  if (FINAL.has(data.status)) return null;
  return { status: data.status, attempt: data.attempt, progress: 0, images: [] };
}

export class EventFeed {
  /** @param {() => Array} activeJobs the Job objects still to follow */
  constructor(activeJobs) {
    this.activeJobs = activeJobs;
    this.controller = null;
    this.timer = null;
    this.ids = "";
  }

  /** Follow the current set of active jobs (restarting the stream if it changed). */
  refresh() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.restart(), RESTART_DEBOUNCE_MS);
  }

  restart(force = false) {
    const jobs = this.activeJobs();
    const ids = jobs.map((j) => j.id).sort().join(",");
    if (ids === this.ids && this.controller && !force) return;
    if (this.controller) this.controller.abort();
    this.controller = null;
    this.ids = ids;
    if (!ids) return;
    const controller = new AbortController();
    this.controller = controller;
    this.run(jobs, controller).catch(() => {});
  }

  async run(jobs, controller) {
    const byId = new Map(jobs.map((j) => [j.id, j]));
    let delay = 0;
    try {
      const response = await openEvents([...byId.keys()], controller.signal);
      for await (const record of sseRecords(response.body, controller.signal)) {
        let data;
        try {
          data = JSON.parse(record.data);
        } catch {
          continue;
        }
        const job = byId.get(data.job || data.id);
        if (!job) continue;
        if (record.event === "done") await job.apply(data);
        else if (record.event === "error") await job.refreshOnce(); // gone: 404 → expired
        else if (record.event === "status" && data.status === "queued") {
          await job.apply(viewFromEvent(record.event, data));
          // Still waiting once the replayed history has passed: one GET says its place.
          setTimeout(() => {
            if (job.record.status === "queued" && !job.removed) job.refreshOnce();
          }, QUEUED_LOOKUP_MS);
        }        else {
          const view = viewFromEvent(record.event, data);
          if (view) await job.apply(view);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error.status === 404) {
        // A job expired: the server names one; ask each job once, then follow the rest.
        for (const job of byId.values()) await job.refreshOnce();
      } else {
        if (error.status === 401) jobs[0]?.hooks.onAuthNeeded();
        for (const job of byId.values()) job.showUpdateFailed(error);
        delay = (error.retryAfter ?? 0) * 1000 || RETRY_MS;
      }
    }
    if (controller.signal.aborted || this.controller !== controller) return;
    this.controller = null;
    this.ids = "";
    // The stream ended: every job it followed ended, or the connection dropped.
    this.timer = setTimeout(() => this.restart(), document.hidden ? Math.max(delay, 4000) : delay);
  }
}
