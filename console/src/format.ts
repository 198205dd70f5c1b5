// Formatting and the client-side checks of the dialogs (the service checks everything again).
import type { Image, Job } from "./api";

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${u[i]}`;
}

export function imageSize(img: Image): number | null {
  const s = img.__image_size !== undefined ? Number(img.__image_size) : NaN;
  if (!Number.isNaN(s) && s > 0) return s;
  return typeof img.size === "number" ? img.size : null;
}

export function duration(secs: number | null | undefined): string {
  if (secs === null || secs === undefined) return "—";
  if (secs < 60) return `${Math.max(0, Math.round(secs))} s`;
  const m = Math.floor(secs / 60);
  if (m < 60) return `${m} min ${Math.round(secs % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function when(t: string | null | undefined): string {
  if (!t) return "—";
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? t : d.toLocaleString();
}

const STATUS_WORDS: Record<string, string> = {
  queued: "Waiting for data",
  saving: "Saving",
  active: "Normal",
  killed: "Failed",
  deleted: "Deleted",
  pending_delete: "Deleting",
};
export const statusWord = (s: string) => STATUS_WORDS[s] ?? s;

const JOB_WORDS: Record<string, string> = {
  imsCopyImageInRegionJob: "Replicate image",
  imsCrossRegionCopyImageJob: "Replicate to another region",
  imsImportImageJob: "Import image",
  imsImportDataImageJob: "Import data-disk image",
  imsNativeImportImageJob: "Register image",
  imsNativeExportImageJob: "Export image",
  imsAddImageMembersJob: "Share image",
  imsDelImageMembersJob: "Stop sharing image",
  imsUpdateImageMembersJob: "Accept or reject shared image",
  imsReencryptImageJob: "Re-encrypt image",
};
export const jobWord = (t: string) => JOB_WORDS[t] ?? t;

const ERROR_WORDS: Record<string, string> = {
  "IMG.0057": "The image file is empty, missing, in the wrong format, or not readable.",
  "IMG.0069": "The bucket cannot be accessed (it does not exist or you have no access).",
  "IMG.0068": "No bucket was given.",
  "IMG.0070": "A file with that name already exists in the bucket.",
  "IMG.0095": "The KMS key does not exist.",
  "IMG.0097": "The KMS key is disabled: enable it on the Keys page.",
  "IMG.0099": "You may not use that KMS key.",
  "IMG.0196": "The shared image must be accepted before it can be replicated.",
  "IMG.0015": "The project has reached its private-image quota.",
  "IMG.0060": "Too many jobs are running: try again when some have finished.",
};

/** A job's failure in plain words: the known code's meaning, then the service's own reason. */
export function jobError(j: Job): string | null {
  if (j.status !== "FAIL") return null;
  const code = j.error_code ?? "";
  const plain = ERROR_WORDS[code];
  const reason = j.fail_reason ?? "The job failed without a reason.";
  return plain && plain !== reason ? `${plain} (${reason})` : reason;
}

export const isEncrypted = (img: Image) => Boolean(img.__system__cmkid);

// ---- client-side checks (each returns a message, or null when fine) -----------------------

const NAME_RE = /^[\p{L}\p{N}._\- ]+$/u;
export function checkImageName(v: string): string | null {
  if (!v.trim()) return "Enter a name for the image.";
  if ([...v].length > 128) return "The name can be at most 128 characters long.";
  if (v !== v.trim()) return "The name cannot start or end with a space.";
  if (!NAME_RE.test(v)) return "Use only letters, digits, spaces, hyphens (-), underscores (_) and periods (.).";
  return null;
}

export function checkDescription(v: string): string | null {
  if ([...v].length > 1024) return "The description can be at most 1024 characters long.";
  if (/[<>\r]/.test(v)) return "The description cannot contain <, > or carriage returns.";
  return null;
}

export const PROJECT_ID_RE = /^[0-9a-f]{32}$/;
/** Splits a list of project ids typed by the user (commas, spaces or lines). */
export function parseProjectIds(v: string): string[] {
  return v
    .split(/[\s,;]+/)
    .map((s) => s.trim())
    .filter(Boolean);
}
export function checkProjectIds(v: string, own: string): string | null {
  const ids = parseProjectIds(v);
  if (ids.length === 0) return "Enter at least one project ID.";
  if (ids.length > 100) return "At most 100 project IDs per share.";
  const bad = ids.filter((i) => !PROJECT_ID_RE.test(i.toLowerCase()));
  if (bad.length) return `Not a project ID: ${bad.join(", ")}. A project ID is 32 hexadecimal characters.`;
  if (ids.some((i) => i.toLowerCase() === own)) return "You cannot share an image with your own project.";
  if (new Set(ids.map((i) => i.toLowerCase())).size !== ids.length) return "A project ID is listed twice.";
  return null;
}

export function checkBucket(v: string): string | null {
  if (!v.trim()) return "Enter the bucket name.";
  if (v.length < 3 || v.length > 63) return "A bucket name is 3 to 63 characters long.";
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(v))
    return "A bucket name has lower-case letters, digits, hyphens and periods, and starts and ends with a letter or digit.";
  return null;
}

export function checkObjectName(v: string, what = "file name"): string | null {
  if (!v.trim()) return `Enter the ${what}.`;
  if (v.length > 1024) return `The ${what} can be at most 1024 characters long.`;
  if (/\s/.test(v)) return `The ${what} cannot contain spaces.`;
  if (/[\\:*?"<>|\x00-\x1f]/.test(v)) return `The ${what} cannot contain \\ : * ? " < > |.`;
  return null;
}

export function checkInt(v: string, min: number, max: number, what: string): string | null {
  if (!/^\d+$/.test(v.trim())) return `Enter the ${what} as a whole number.`;
  const n = Number(v);
  if (n < min || n > max) return `The ${what} must be from ${min} to ${max}.`;
  return null;
}

export function checkRequired(v: string, what: string): string | null {
  return v.trim() ? null : `Enter the ${what}.`;
}
