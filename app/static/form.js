// The generation form: read it into a request body, fill it from a job, show field errors.
// Ranges are the server's to check (its limits are settings); the page only turns text into
// the JSON types the API demands (it rejects numbers sent as strings).

const MAX_SEED = 2 ** 53; // seeds are integers in [0, 2^53): exact in JavaScript

/** The request fields the form edits, in the order API.md lists them. */
export const PARAM_FIELDS = [
  "num_images",
  "temperature",
  "top_k",
  "top_p",
  "guidance_scale",
  "seed",
];

export class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

const input = (name) => document.getElementById(name);

/** A uniformly drawn seed in [0, 2^53), from the browser's cryptographic generator. */
export function randomSeed() {
  const [high, low] = crypto.getRandomValues(new Uint32Array(2));
  return (high & 0x1fffff) * 2 ** 32 + low; // 21 + 32 = 53 bits
}

function readNumber(name, { integer = false, optional = false } = {}) {
  const raw = input(name).value.trim();
  if (raw === "") {
    if (optional) return null;
    throw new FieldError(name, "Enter a number.");
  }
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new FieldError(name, "Enter a number.");
  if (integer && !Number.isInteger(value)) throw new FieldError(name, "Enter a whole number.");
  return value;
}

function readSeed() {
  const raw = input("seed").value.trim();
  if (raw === "") return null;
  if (!/^\d+$/.test(raw) || Number(raw) >= MAX_SEED) {
    const message = `Enter a whole number from 0 to ${MAX_SEED - 1}, or leave it empty.`;
    throw new FieldError("seed", message);
  }
  return Number(raw);
}

/** The POST /v1/generations body; throws FieldError for text that is not a number. */
export function readForm() {
  const model = input("model").value;
  return {
    ...(model ? { model } : {}), // the picker's choice (empty: the server's default)
    prompt: input("prompt").value,
    num_images: readNumber("num_images", { integer: true }),
    temperature: readNumber("temperature"),
    top_k: readNumber("top_k", { integer: true }),
    top_p: readNumber("top_p"),
    guidance_scale: readNumber("guidance_scale", { optional: true }),
    seed: readSeed(),
  };
}

/** Put a job's prompt and parameters back in the form (for "same seed" / "new seed"). */
export function fillForm(params) {
  if (typeof params.prompt === "string") input("prompt").value = params.prompt;
  const picker = input("model");
  if (typeof params.model === "string" && [...picker.options].some((o) => o.value === params.model)) {
    picker.value = params.model;
    picker.dispatchEvent(new Event("change"));
  }
  for (const name of PARAM_FIELDS) {
    if (name in params) input(name).value = params[name] == null ? "" : String(params[name]);
  }
}

/** The form field a server error's dotted path names ("body.temperature" → "temperature"). */
export function fieldFromPath(path) {
  if (!path) return null;
  const parts = String(path).split(".").reverse();
  return parts.find((part) => part === "prompt" || part === "model" || PARAM_FIELDS.includes(part)) || null;
}

export function labelOf(name) {
  const label = document.querySelector(`label[for="${name}"]`);
  return label ? label.textContent.trim() : name;
}

export function showFieldError(name, message) {
  const field = input(name);
  const note = input(`${name}-error`);
  if (!field || !note) return;
  field.setAttribute("aria-invalid", "true");
  note.textContent = message;
  note.hidden = false;
}

export function clearFieldErrors() {
  for (const field of document.querySelectorAll("[aria-invalid=true]")) {
    field.removeAttribute("aria-invalid");
  }
  for (const note of document.querySelectorAll(".field-error")) {
    note.hidden = true;
    note.textContent = "";
  }
}
