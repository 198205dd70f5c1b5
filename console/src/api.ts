// The console's only way to the service: the public APIs, with the Keystone token of the
// signed-in user in X-Auth-Token. Nothing here is console-specific on the server side.

export interface Session {
  token: string;
  projectId: string;
  projectName: string;
  userName: string;
  domain: string;
  expiresAt: string;
}

const KEY = "openims.session";

export function loadSession(): Session | null {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) || "null") as Session | null;
    if (s && new Date(s.expiresAt).getTime() > Date.now()) return s;
  } catch {
    /* ignore a corrupt entry */
  }
  return null;
}

export function saveSession(s: Session | null) {
  if (s) sessionStorage.setItem(KEY, JSON.stringify(s));
  else sessionStorage.removeItem(KEY);
}

/** An error answer of the service, with its IMG/KMS code when there is one. */
export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string | null,
    message: string,
  ) {
    super(message);
  }
}

let onUnauthorized: () => void = () => {};
export function setUnauthorizedHandler(f: () => void) {
  onUnauthorized = f;
}

/** Pulls `{code, message}` out of the service's error shapes (IMS, Glance, Keystone, KMS). */
export function parseError(status: number, text: string): ApiError {
  let code: string | null = null;
  let message = "";
  try {
    const j = JSON.parse(text);
    const e = j.error ?? j;
    code = e.code ?? e.error_code ?? null;
    message = e.message ?? e.error_msg ?? e.title ?? "";
    if (typeof code === "number") code = null;
    if (!message && typeof e.explanation === "string") message = e.explanation;
  } catch {
    message = text.trim().slice(0, 300);
  }
  if (!message) message = `The service answered HTTP ${status}.`;
  return new ApiError(status, code, message);
}

export async function signIn(
  endpoint: string,
  user: string,
  password: string,
  domain: string,
  project: string,
): Promise<Session> {
  const r = await fetch(`${endpoint}/v3/auth/tokens`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      auth: {
        identity: {
          methods: ["password"],
          password: { user: { name: user, domain: { name: domain }, password } },
        },
        scope: { project: { name: project, domain: { name: domain } } },
      },
    }),
  });
  if (r.status === 401) throw new ApiError(401, null, "The user name, password, domain or project is wrong.");
  if (!r.ok) throw parseError(r.status, await r.text());
  const token = r.headers.get("X-Subject-Token");
  const body = await r.json();
  if (!token) throw new ApiError(500, null, "The service issued no token.");
  return {
    token,
    projectId: body.token.project.id,
    projectName: body.token.project.name,
    userName: body.token.user.name,
    domain,
    expiresAt: body.token.expires_at,
  };
}

let session: Session | null = loadSession();
export function currentSession() {
  return session;
}
export function setSession(s: Session | null) {
  session = s;
  saveSession(s);
}

/** A JSON call with the session's token; throws ApiError on any non-2xx answer. */
export async function call<T = any>(method: string, path: string, body?: unknown): Promise<T> {
  if (!session) throw new ApiError(401, null, "Not signed in.");
  const headers: Record<string, string> = { "X-Auth-Token": session.token, Accept: "application/json" };
  let payload: string | undefined;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body: payload });
  const text = await r.text();
  if (r.status === 401) {
    onUnauthorized();
    throw parseError(401, text);
  }
  if (!r.ok) throw parseError(r.status, text);
  return (text ? JSON.parse(text) : null) as T;
}

/** `PUT /v2/images/{id}/file` with upload progress (fetch has none, so XMLHttpRequest). */
export function uploadFile(
  imageId: string,
  file: Blob,
  onProgress: (sent: number, total: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  return new Promise((resolve, reject) => {
    if (!session) return reject(new ApiError(401, null, "Not signed in."));
    const x = new XMLHttpRequest();
    x.open("PUT", `/v2/images/${encodeURIComponent(imageId)}/file`);
    x.setRequestHeader("X-Auth-Token", session.token);
    x.setRequestHeader("Content-Type", "application/octet-stream");
    x.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    x.onload = () => {
      if (x.status >= 200 && x.status < 300) resolve();
      else reject(parseError(x.status, x.responseText));
    };
    x.onerror = () => reject(new ApiError(0, null, "The upload was interrupted (network error)."));
    x.onabort = () => reject(new ApiError(0, null, "The upload was cancelled."));
    signal?.addEventListener("abort", () => x.abort());
    x.send(file);
  });
}

// ---- typed helpers for the calls the pages make -------------------------------------------

export interface Image {
  id: string;
  name: string;
  status: string;
  disk_format?: string;
  size?: number | null;
  virtual_size?: number | null;
  min_disk?: number;
  min_ram?: number;
  owner: string;
  visibility: string;
  protected?: boolean;
  created_at: string;
  updated_at?: string;
  __image_size?: string;
  __system__cmkid?: string;
  __os_version?: string;
  __platform?: string;
  __os_type?: string;
  __description?: string;
  __imagetype?: string;
  __root_origin?: string;
  __originalimagename?: string;
  virtual_env_type?: string;
  tags?: string[];
  [k: string]: unknown;
}

export interface Job {
  job_id: string;
  job_type: string;
  status: "INIT" | "RUNNING" | "SUCCESS" | "FAIL";
  begin_time: string | null;
  end_time: string | null;
  error_code: string | null;
  fail_reason: string | null;
  entities: {
    image_id?: string | null;
    image_name?: string | null;
    current_task?: string | null;
    process_percent?: number;
    bytes_done?: number;
    bytes_total?: number;
    throughput_bytes_per_second?: number | null;
    eta_seconds?: number | null;
    queue_position?: number | null;
    results?: { image_id: string; project_id: string; status: string }[];
  };
}

export interface KmsKey {
  key_id: string;
  key_alias: string;
  key_state: string;
  key_description: string;
  creation_date: string;
  key_spec: string;
}

export const pid = () => session!.projectId;

export const api = {
  listPrivate: () =>
    call<{ images: Image[] }>("GET", "/v2/cloudimages?__imagetype=private&limit=1000").then((r) => r.images),
  listShared: (memberStatus: string) =>
    call<{ images: Image[] }>(
      "GET",
      `/v2/cloudimages?__imagetype=shared&visibility=shared&member_status=${encodeURIComponent(memberStatus)}&limit=1000`,
    ).then((r) => r.images),
  image: (id: string) => call<Image>("GET", `/v2/images/${encodeURIComponent(id)}`),
  deleteImage: (id: string) => call("DELETE", `/v2/images/${encodeURIComponent(id)}`),
  createMetadata: (body: Record<string, unknown>) => call<Image>("POST", "/v2/images", body),
  importFromBucket: (body: Record<string, unknown>) => call<{ job_id: string }>("POST", "/v2/cloudimages/action", body),
  importDataFromBucket: (body: Record<string, unknown>) =>
    call<{ job_id: string }>("POST", "/v1/cloudimages/dataimages/action", body),
  quickImport: (body: Record<string, unknown>) =>
    call<{ job_id: string }>("POST", "/v2/cloudimages/quickimport/action", body),
  copyInRegion: (id: string, body: Record<string, unknown>) =>
    call<{ job_id: string }>("POST", `/v1/cloudimages/${encodeURIComponent(id)}/copy`, body),
  copyCrossRegion: (id: string, body: Record<string, unknown>) =>
    call<{ job_id: string }>("POST", `/v1/cloudimages/${encodeURIComponent(id)}/cross_region_copy`, body),
  exportImage: (id: string, body: Record<string, unknown>) =>
    call<{ job_id: string }>("POST", `/v1/cloudimages/${encodeURIComponent(id)}/file`, body),
  share: (images: string[], projects: string[]) =>
    call<{ job_id: string }>("POST", "/v1/cloudimages/members", { images, projects }),
  unshare: (images: string[], projects: string[]) =>
    call<{ job_id: string }>("DELETE", "/v1/cloudimages/members", { images, projects }),
  members: (id: string) =>
    call<{ members: { member_id: string; status: string; created_at: string }[] }>(
      "GET",
      `/v1/${pid()}/cloudimages/${encodeURIComponent(id)}/members`,
    ).then((r) => r.members),
  answerShare: (images: string[], status: "accepted" | "rejected") =>
    call<{ job_id: string }>("PUT", "/v1/cloudimages/members", { images, project_id: pid(), status }),
  job: (id: string) => call<Job>("GET", `/v1/${pid()}/jobs/${encodeURIComponent(id)}`),
  jobs: () => call<{ jobs: Job[] }>("GET", `/v1/${pid()}/jobs?limit=100`).then((r) => r.jobs),
  usage: () => call<Record<string, any>>("GET", "/v1/cloudimages/usage"),
  quota: () =>
    call<{ quotas: { resources: { type: string; used: number; quota: number }[] } }>("GET", "/v1/cloudimages/quota"),
  osVersions: () =>
    call<{ platform: string; version_list: { os_version: string }[] }[]>("GET", "/v1/cloudimages/os_version"),
  keys: () =>
    call<{ key_details: KmsKey[] }>("POST", `/v1.0/${pid()}/kms/list-keys`, { limit: 1000 }).then((r) => r.key_details),
  createKey: (alias: string, description: string) =>
    call("POST", `/v1.0/${pid()}/kms/create-key`, { key_alias: alias, key_description: description || undefined }),
  enableKey: (id: string) => call("POST", `/v1.0/${pid()}/kms/enable-key`, { key_id: id }),
  disableKey: (id: string) => call("POST", `/v1.0/${pid()}/kms/disable-key`, { key_id: id }),
};

/** Polls a job until it ends (SUCCESS or FAIL), at most `timeoutMs`. */
export async function waitJob(id: string, timeoutMs = 600_000): Promise<Job> {
  const end = Date.now() + timeoutMs;
  let delay = 250;
  for (;;) {
    const j = await api.job(id);
    if (j.status === "SUCCESS" || j.status === "FAIL") return j;
    if (Date.now() > end) return j;
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 2000);
  }
}
