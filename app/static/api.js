// The HTTP contract of API.md, and nothing about the page: every call goes through
// request(), which adds the API key and turns an error body into an ApiError.

const KEY_STORAGE = "promptpix.apiKey";

/** An HTTP error as API.md writes it: {"error": {"code", "message", "field"}}. */
export class ApiError extends Error {
  constructor(status, code, message, { field = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status; // 0 when the server could not be reached at all
    this.code = code;
    this.field = field; // dotted path of the invalid field (422 only)
    this.retryAfter = retryAfter; // seconds, from the Retry-After header
  }
}

export function getApiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** Retry-After is either delay-seconds or an HTTP date; returns whole seconds or null. */
function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): the status line still says something.
  }
  const error = (body && body.error) || {};
  return new ApiError(
    response.status,
    error.code || `http_${response.status}`,
    error.message || response.statusText || `HTTP ${response.status}`,
    {
      field: error.field || null,
      retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
    },
  );
}

// However many jobs the page follows, it sends at most this many API requests a second
// (after a burst of BURST): 240 a minute, well under the server's default limit of 600 per
// key or address, so a second tab fits too. Polls wait their turn; a submission or a
// cancel goes ahead of them.
const MAX_REQUESTS_PER_S = 4;
const BURST = 8;
const budget = { tokens: BURST, at: performance.now(), waiting: [], timer: null };

function drainBudget() {
  budget.timer = null;
  const now = performance.now();
  budget.tokens = Math.min(BURST, budget.tokens + ((now - budget.at) * MAX_REQUESTS_PER_S) / 1000);
  budget.at = now;
  while (budget.waiting.length && budget.tokens >= 1) {
    budget.tokens -= 1;
    budget.waiting.shift()();
  }
  if (budget.waiting.length) {
    const wait = Math.ceil(((1 - budget.tokens) * 1000) / MAX_REQUESTS_PER_S);
    budget.timer = setTimeout(drainBudget, wait);
  }
}

/** Resolves when this page may send one more request. */
function requestSlot(urgent) {
  return new Promise((resolve) => {
    if (urgent) budget.waiting.unshift(resolve);
    else budget.waiting.push(resolve);
    if (!budget.timer) drainBudget();
  });
}

/** fetch() with the API key, no HTTP cache, and an ApiError for anything but 2xx. */
export async function request(path, { method = "GET", body, signal } = {}) {
  await requestSlot(method !== "GET");
  const headers = {};
  const key = getApiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: "no-store", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network_error", "The server cannot be reached.");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

const jobPath = (id) => `/v1/generations/${encodeURIComponent(id)}`;
const scorePath = (id) => `/v1/scores/${encodeURIComponent(id)}`;

/** The served models: OpenAI's list shape ("data"; older servers: "models" or bare). */
export async function listModels() {
  const body = await (await request("/v1/models")).json();
  if (Array.isArray(body)) return body;
  return body.data || body.models || [];
}

export async function submitJob(params) {
  return (await request("/v1/generations", { method: "POST", body: params })).json();
}

export async function jobStatus(id) {
  return (await request(jobPath(id))).json();
}

/** POST /v1/scores: {image (base64) | job_id + image_index, captions}. */
export async function submitScore(body) {
  return (await request("/v1/scores", { method: "POST", body })).json();
}

export async function scoreStatus(id) {
  return (await request(scorePath(id))).json();
}

/** A Blob's bytes as plain base64 (no `data:` prefix), for a JSON upload. */
export function toBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** The multiplexed event stream of several jobs (a streaming Response; read its body). */
export async function openEvents(ids, signal) {
  const query = ids.map(encodeURIComponent).join(",");
  return request(`/v1/events?ids=${query}`, { signal });
}

export async function cancelJob(id) {
  return (await request(jobPath(id), { method: "DELETE" })).json();
}

/**
 * A PNG as a Blob. Images are fetched rather than put in <img src> because with API keys on
 * they need the Authorization header, which an <img> cannot send.
 * `bust` adds a query string so no cache in between can hand back an older preview.
 */
export async function fetchImage(url, { bust = false } = {}) {
  const target = bust ? `${url}${url.includes("?") ? "&" : "?"}t=${Date.now()}` : url;
  return (await request(target)).blob();
}

/** GET /readyz: {reachable, ready, reason}. It needs no key, and its 503 body says why. */
export async function readiness() {
  let response;
  try {
    response = await fetch("/readyz", { cache: "no-store" });
  } catch {
    return { reachable: false, ready: false, reason: "the server cannot be reached" };
  }
  if (response.ok) return { reachable: true, ready: true, reason: "" };
  return { reachable: true, ready: false, reason: await reasonFrom(response) };
}

async function reasonFrom(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const reason = body.reason || body.detail || (body.error && body.error.message) || body.status;
    if (typeof reason === "string") return reason;
    if (Array.isArray(reason)) return reason.join("; ");
  } catch {
    // plain text
  }
  return text.trim() || `HTTP ${response.status}`;
}
