// Private Images: list (status, size, format, encryption; filters and search), details, and
// the Register/Import, Replicate, Share, Export and Delete dialogs.
import type { ComponentChildren } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { api, ApiError, currentSession, Image, KmsKey, uploadFile } from "./api";
import { Bar, Field, Modal, Notice, StatusBadge } from "./components";
import {
  bytes,
  checkBucket,
  checkDescription,
  checkImageName,
  checkInt,
  checkObjectName,
  checkProjectIds,
  checkRequired,
  imageSize,
  isEncrypted,
  parseProjectIds,
  statusWord,
  when,
} from "./format";

type Errors = Record<string, string | null>;
const anyError = (e: Errors) => Object.values(e).some(Boolean);

/** Where a service error belongs in a dialog: the field its IMG code is about, else the form. */
function placeError(err: unknown, fields: Record<string, string[]>): Errors {
  if (err instanceof ApiError) {
    for (const [field, codes] of Object.entries(fields)) {
      if (err.code && codes.includes(err.code)) return { [field]: err.message };
    }
    return { form: err.code ? `${err.message} (${err.code})` : err.message };
  }
  return { form: String(err) };
}

export interface Started {
  what: string;
  jobId: string;
}

export function JobStarted(props: { started: Started | null }) {
  if (!props.started) return null;
  return (
    <Notice kind="ok">
      {props.started.what} started as job <code data-testid="job-id">{props.started.jobId}</code>.{" "}
      <a href={`#/jobs`}>Follow it on the Jobs page</a>.
    </Notice>
  );
}

function useKeys(): KmsKey[] {
  const [keys, setKeys] = useState<KmsKey[]>([]);
  useEffect(() => {
    api.keys().then(setKeys, () => setKeys([]));
  }, []);
  return keys;
}

function Buttons(props: { busy: boolean; submit: string; onCancel: () => void }) {
  return (
    <div class="buttons">
      <button type="button" onClick={props.onCancel}>
        Cancel
      </button>
      <button type="submit" class="primary" disabled={props.busy}>
        {props.busy ? "Working…" : props.submit}
      </button>
    </div>
  );
}

// ---- Replicate ------------------------------------------------------------------------------

export function ReplicateDialog(props: { image: Image; onClose: () => void; onStarted: (s: Started) => void }) {
  const keys = useKeys();
  const [mode, setMode] = useState<"in" | "cross">("in");
  const [name, setName] = useState(`${props.image.name}-copy`.slice(0, 128));
  const [description, setDescription] = useState("");
  const [cmk, setCmk] = useState("");
  const [region, setRegion] = useState("");
  const [projectName, setProjectName] = useState("");
  const [agency, setAgency] = useState("");
  const [errors, setErrors] = useState<Errors>({});
  const [busy, setBusy] = useState(false);

  async function submit(e: Event) {
    e.preventDefault();
    const errs: Errors = { name: checkImageName(name), description: checkDescription(description) };
    if (mode === "cross") {
      errs.region = checkRequired(region, "destination region");
      errs.project = checkRequired(projectName, "destination project name");
      errs.agency = checkRequired(agency, "agency name");
    }
    setErrors(errs);
    if (anyError(errs)) return;
    setBusy(true);
    try {
      const r =
        mode === "in"
          ? await api.copyInRegion(props.image.id, {
              name,
              ...(description ? { description } : {}),
              ...(cmk ? { cmk_id: cmk } : {}),
            })
          : await api.copyCrossRegion(props.image.id, {
              name,
              ...(description ? { description } : {}),
              region,
              project_name: projectName,
              agency_name: agency,
            });
      props.onStarted({ what: `Replication of ${props.image.name}`, jobId: r.job_id });
      props.onClose();
    } catch (err) {
      setErrors(
        placeError(err, {
          name: ["IMG.0002", "IMG.0003", "IMG.0009", "IMG.0013"],
          description: ["IMG.0004", "IMG.0054"],
          cmk: ["IMG.0095", "IMG.0096", "IMG.0097", "IMG.0099"],
          region: ["IMG.0177"],
          project: ["IMG.0104", "IMG.0145", "IMG.0178"],
          agency: ["IMG.0179"],
        }),
      );
    } finally {
      setBusy(false);
    }
  }

  const usable = keys.filter((k) => k.key_state === "2");
  return (
    <Modal title={`Replicate ${props.image.name}`} onClose={props.onClose}>
      <form onSubmit={submit} noValidate>
        <fieldset class="choice">
          <legend>Destination</legend>
          <label>
            <input type="radio" name="mode" checked={mode === "in"} onChange={() => setMode("in")} /> This region
          </label>
          <label>
            <input type="radio" name="mode" checked={mode === "cross"} onChange={() => setMode("cross")} /> Another region
          </label>
        </fieldset>
        <Field label="New image name" error={errors.name}>
          {(a) => <input {...a} name="name" value={name} onInput={(e) => setName(e.currentTarget.value)} />}
        </Field>
        <Field label="Description (optional)" error={errors.description}>
          {(a) => (
            <textarea {...a} name="description" rows={2} value={description} onInput={(e) => setDescription(e.currentTarget.value)} />
          )}
        </Field>
        {mode === "in" ? (
          <Field
            label="Encryption key (KMS)"
            error={errors.cmk}
            hint="Choose a key to encrypt the copy, or none for an unencrypted copy (this also decrypts an encrypted image)."
          >
            {(a) => (
              <select {...a} name="cmk_id" value={cmk} onChange={(e) => setCmk(e.currentTarget.value)}>
                <option value="">No encryption</option>
                {usable.map((k) => (
                  <option key={k.key_id} value={k.key_id}>
                    {k.key_alias} ({k.key_id.slice(0, 8)}…)
                  </option>
                ))}
              </select>
            )}
          </Field>
        ) : (
          <>
            <Field label="Destination region" error={errors.region}>
              {(a) => <input {...a} name="region" value={region} onInput={(e) => setRegion(e.currentTarget.value)} />}
            </Field>
            <Field label="Destination project name" error={errors.project}>
              {(a) => (
                <input {...a} name="project_name" value={projectName} onInput={(e) => setProjectName(e.currentTarget.value)} />
              )}
            </Field>
            <Field label="Agency name" error={errors.agency} hint="The IAM agency the service uses in the destination region.">
              {(a) => <input {...a} name="agency_name" value={agency} onInput={(e) => setAgency(e.currentTarget.value)} />}
            </Field>
          </>
        )}
        {errors.form && <Notice kind="error">{errors.form}</Notice>}
        <Buttons busy={busy} submit="Replicate" onCancel={props.onClose} />
      </form>
    </Modal>
  );
}

// ---- Share ----------------------------------------------------------------------------------

export function ShareDialog(props: { image: Image; onClose: () => void; onStarted: (s: Started) => void }) {
  const [ids, setIds] = useState("");
  const [errors, setErrors] = useState<Errors>({});
  const [busy, setBusy] = useState(false);
  const [members, setMembers] = useState<{ member_id: string; status: string }[] | null>(null);
  useEffect(() => {
    api.members(props.image.id).then(setMembers, () => setMembers(null));
  }, []);

  async function submit(e: Event) {
    e.preventDefault();
    const errs = { projects: checkProjectIds(ids, currentSession()!.projectId) };
    setErrors(errs);
    if (anyError(errs)) return;
    setBusy(true);
    try {
      const projects = parseProjectIds(ids).map((s) => s.toLowerCase());
      const r = await api.share([props.image.id], projects);
      props.onStarted({ what: `Sharing ${props.image.name} with ${projects.length} project(s)`, jobId: r.job_id });
      props.onClose();
    } catch (err) {
      setErrors(placeError(err, { projects: ["IMG.0076", "IMG.0088", "IMG.0178"] }));
    } finally {
      setBusy(false);
    }
  }

  async function stop(member: string) {
    try {
      const r = await api.unshare([props.image.id], [member]);
      props.onStarted({ what: `Stopping sharing of ${props.image.name} with ${member}`, jobId: r.job_id });
      props.onClose();
    } catch (err) {
      setErrors(placeError(err, {}));
    }
  }

  return (
    <Modal title={`Share ${props.image.name}`} onClose={props.onClose}>
      <form onSubmit={submit} noValidate>
        <Field
          label="Project IDs to share with"
          error={errors.projects}
          hint="One or more project IDs (32 hexadecimal characters), separated by commas, spaces or new lines."
        >
          {(a) => <textarea {...a} name="projects" rows={3} value={ids} onInput={(e) => setIds(e.currentTarget.value)} />}
        </Field>
        {members && members.length > 0 && (
          <table class="members">
            <caption>Already shared with</caption>
            <thead>
              <tr>
                <th scope="col">Project</th>
                <th scope="col">Status</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {members.map((m) => (
                <tr key={m.member_id}>
                  <td>
                    <code>{m.member_id}</code>
                  </td>
                  <td>{m.status}</td>
                  <td>
                    <button type="button" onClick={() => stop(m.member_id)}>
                      Stop sharing
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
        {errors.form && <Notice kind="error">{errors.form}</Notice>}
        <Buttons busy={busy} submit="Share" onCancel={props.onClose} />
      </form>
    </Modal>
  );
}

// ---- Export ---------------------------------------------------------------------------------

export function ExportDialog(props: { image: Image; onClose: () => void; onStarted: (s: Started) => void }) {
  const [bucket, setBucket] = useState("");
  const [file, setFile] = useState(`${props.image.name.replace(/\s+/g, "-")}.qcow2`);
  const [format, setFormat] = useState("qcow2");
  const [quick, setQuick] = useState(false);
  const [errors, setErrors] = useState<Errors>({});
  const [busy, setBusy] = useState(false);

  async function submit(e: Event) {
    e.preventDefault();
    const errs = { bucket: checkBucket(bucket), file: checkObjectName(file) };
    setErrors(errs);
    if (anyError(errs)) return;
    setBusy(true);
    try {
      const r = await api.exportImage(props.image.id, {
        bucket_url: `${bucket}:${file}`,
        ...(quick ? { is_quick_export: true } : { file_format: format }),
      });
      props.onStarted({ what: `Export of ${props.image.name} to ${bucket}:${file}`, jobId: r.job_id });
      props.onClose();
    } catch (err) {
      setErrors(
        placeError(err, {
          bucket: ["IMG.0068", "IMG.0069", "IMG.0109", "IMG.0058"],
          file: ["IMG.0070", "IMG.0073", "IMG.0074", "IMG.0075", "IMG.0175"],
          format: ["IMG.0072"],
        }),
      );
    } finally {
      setBusy(false);
    }
  }

  return (
    <Modal title={`Export ${props.image.name}`} onClose={props.onClose}>
      <form onSubmit={submit} noValidate>
        <Field label="Bucket" error={errors.bucket}>
          {(a) => <input {...a} name="bucket" value={bucket} onInput={(e) => setBucket(e.currentTarget.value)} />}
        </Field>
        <Field label="File name" error={errors.file} hint="Object name in the bucket (folders with /; no spaces).">
          {(a) => <input {...a} name="file" value={file} onInput={(e) => setFile(e.currentTarget.value)} />}
        </Field>
        <Field label="Format" error={errors.format}>
          {(a) => (
            <select {...a} name="format" value={format} disabled={quick} onChange={(e) => setFormat(e.currentTarget.value)}>
              <option value="qcow2">QCOW2</option>
              <option value="vhd">VHD</option>
              <option value="vmdk">VMDK (stream-optimized)</option>
            </select>
          )}
        </Field>
        <div class="field check">
          <label>
            <input type="checkbox" name="quick" checked={quick} onChange={(e) => setQuick(e.currentTarget.checked)} /> Quick
            export: the raw disk plus its allocation bitmap (as <i>file name</i>.bitmap), for a quick import; no format
            choice, not for encrypted images
          </label>
        </div>
        {errors.form && <Notice kind="error">{errors.form}</Notice>}
        <Buttons busy={busy} submit="Export" onCancel={props.onClose} />
      </form>
    </Modal>
  );
}

// ---- Delete ---------------------------------------------------------------------------------

export function DeleteDialog(props: { image: Image; onClose: () => void; onDeleted: () => void }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  async function submit(e: Event) {
    e.preventDefault();
    setBusy(true);
    try {
      await api.deleteImage(props.image.id);
      props.onDeleted();
      props.onClose();
    } catch (err) {
      setError(err instanceof ApiError ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <Modal title={`Delete ${props.image.name}`} onClose={props.onClose}>
      <form onSubmit={submit}>
        <p>
          Delete the image <strong>{props.image.name}</strong> (<code>{props.image.id}</code>)? Projects it is shared with
          lose access to it. This cannot be undone.
        </p>
        {error && <Notice kind="error">{error}</Notice>}
        <Buttons busy={busy} submit="Delete" onCancel={props.onClose} />
      </form>
    </Modal>
  );
}

// ---- Register / Import ----------------------------------------------------------------------

const FORMAT_BY_EXT: Record<string, string> = {
  qcow2: "qcow2",
  img: "raw",
  raw: "raw",
  vhd: "vhd",
  vhdx: "vhdx",
  vmdk: "vmdk",
  vdi: "vdi",
  iso: "iso",
};

export function ImportDialog(props: { onClose: () => void; onStarted: (s: Started) => void; onUploaded: () => void }) {
  const [source, setSource] = useState<"bucket" | "upload">("bucket");
  const [name, setName] = useState("");
  const [description, setDescription] = useState("");
  const [bucket, setBucket] = useState("");
  const [object, setObject] = useState("");
  const [kind, setKind] = useState<"system" | "data">("system");
  const [minDisk, setMinDisk] = useState("40");
  const [osVersion, setOsVersion] = useState("");
  const [cmk, setCmk] = useState("");
  const [file, setFile] = useState<File | null>(null);
  const [diskFormat, setDiskFormat] = useState("qcow2");
  const [errors, setErrors] = useState<Errors>({});
  const [busy, setBusy] = useState(false);
  const [progress, setProgress] = useState<{ sent: number; total: number } | null>(null);
  const [osList, setOsList] = useState<string[]>([]);
  const keys = useKeys();
  useEffect(() => {
    api.osVersions().then(
      (l) => setOsList(l.flatMap((p) => p.version_list.map((v) => v.os_version))),
      () => setOsList([]),
    );
  }, []);

  async function submitBucket() {
    const errs: Errors = {
      name: checkImageName(name),
      description: checkDescription(description),
      bucket: checkBucket(bucket),
      object: checkObjectName(object, "object name"),
      minDisk: kind === "system" ? checkInt(minDisk, 1, 1024, "minimum disk (GB)") : checkInt(minDisk, 1, 2048, "minimum disk (GB)"),
    };
    setErrors(errs);
    if (anyError(errs)) return;
    setBusy(true);
    try {
      const common = {
        name,
        image_url: `${bucket}:${object}`,
        min_disk: Number(minDisk),
        ...(description ? { description } : {}),
        ...(cmk ? { cmk_id: cmk } : {}),
      };
      const r =
        kind === "system"
          ? await api.importFromBucket({ ...common, ...(osVersion ? { os_version: osVersion } : {}) })
          : await api.importDataFromBucket(common);
      props.onStarted({ what: `Import of ${name} from ${bucket}:${object}`, jobId: r.job_id });
      props.onClose();
    } catch (err) {
      setErrors(
        placeError(err, {
          name: ["IMG.0002", "IMG.0003", "IMG.0009", "IMG.0013"],
          description: ["IMG.0004", "IMG.0054"],
          bucket: ["IMG.0068", "IMG.0069", "IMG.0109", "IMG.0058"],
          object: ["IMG.0057", "IMG.0017", "IMG.0059"],
          minDisk: ["IMG.0055"],
          os: ["IMG.0056", "IMG.0166"],
          cmk: ["IMG.0095", "IMG.0097", "IMG.0099"],
        }),
      );
    } finally {
      setBusy(false);
    }
  }

  async function submitUpload() {
    const errs: Errors = {
      name: checkImageName(name),
      file: file ? (file.size === 0 ? "The chosen file is empty." : null) : "Choose an image file to upload.",
      minDisk: checkInt(minDisk, 0, 1024, "minimum disk (GB)"),
    };
    setErrors(errs);
    if (anyError(errs) || !file) return;
    setBusy(true);
    let created: string | null = null;
    try {
      const img = await api.createMetadata({
        name,
        disk_format: diskFormat,
        container_format: "bare",
        min_disk: Number(minDisk),
        ...(osVersion ? { __os_version: osVersion } : {}),
      });
      created = img.id;
      setProgress({ sent: 0, total: file.size });
      await uploadFile(img.id, file, (sent, total) => setProgress({ sent, total }));
      props.onUploaded();
      props.onClose();
    } catch (err) {
      setErrors(
        placeError(err, {
          name: ["IMG.0002", "IMG.0003", "IMG.0009", "IMG.0013"],
          file: ["IMG.0057", "IMG.0059"],
        }),
      );
      // An image whose upload failed stays 'queued' or 'killed': remove it so nothing half-made is left.
      if (created) api.deleteImage(created).catch(() => {});
      setProgress(null);
    } finally {
      setBusy(false);
    }
  }

  function submit(e: Event) {
    e.preventDefault();
    if (source === "bucket") submitBucket();
    else submitUpload();
  }

  return (
    <Modal title="Register or import an image" onClose={props.onClose} wide>
      <form onSubmit={submit} noValidate>
        <fieldset class="choice">
          <legend>Source</legend>
          <label>
            <input type="radio" name="source" checked={source === "bucket"} onChange={() => setSource("bucket")} /> Image file in
            a bucket
          </label>
          <label>
            <input type="radio" name="source" checked={source === "upload"} onChange={() => setSource("upload")} /> Upload from
            this computer
          </label>
        </fieldset>
        <Field label="Image name" error={errors.name}>
          {(a) => <input {...a} name="name" value={name} onInput={(e) => setName(e.currentTarget.value)} />}
        </Field>
        {source === "bucket" ? (
          <>
            <fieldset class="choice">
              <legend>Disk</legend>
              <label>
                <input type="radio" name="kind" checked={kind === "system"} onChange={() => setKind("system")} /> System disk
              </label>
              <label>
                <input type="radio" name="kind" checked={kind === "data"} onChange={() => setKind("data")} /> Data disk
              </label>
            </fieldset>
            <div class="row">
              <Field label="Bucket" error={errors.bucket}>
                {(a) => <input {...a} name="bucket" value={bucket} onInput={(e) => setBucket(e.currentTarget.value)} />}
              </Field>
              <Field label="Object (file) name" error={errors.object}>
                {(a) => <input {...a} name="object" value={object} onInput={(e) => setObject(e.currentTarget.value)} />}
              </Field>
            </div>
            <Field label="Description (optional)" error={errors.description}>
              {(a) => (
                <textarea {...a} name="description" rows={2} value={description} onInput={(e) => setDescription(e.currentTarget.value)} />
              )}
            </Field>
            <Field label="Encryption key (KMS)" error={errors.cmk}>
              {(a) => (
                <select {...a} name="cmk_id" value={cmk} onChange={(e) => setCmk(e.currentTarget.value)}>
                  <option value="">No encryption</option>
                  {keys
                    .filter((k) => k.key_state === "2")
                    .map((k) => (
                      <option key={k.key_id} value={k.key_id}>
                        {k.key_alias}
                      </option>
                    ))}
                </select>
              )}
            </Field>
          </>
        ) : (
          <>
            <Field label="Image file" error={errors.file}>
              {(a) => (
                <input
                  {...a}
                  name="file"
                  type="file"
                  onChange={(e) => {
                    const f = e.currentTarget.files?.[0] ?? null;
                    setFile(f);
                    const ext = f?.name.split(".").pop()?.toLowerCase() ?? "";
                    if (FORMAT_BY_EXT[ext]) setDiskFormat(FORMAT_BY_EXT[ext]);
                    if (f && !name) setName(f.name.replace(/\.[^.]+$/, "").replace(/[^\p{L}\p{N}._\- ]/gu, "-").slice(0, 128));
                  }}
                />
              )}
            </Field>
            <Field label="Disk format" hint="The service inspects the file and refuses one that is not of this format.">
              {(a) => (
                <select {...a} name="disk_format" value={diskFormat} onChange={(e) => setDiskFormat(e.currentTarget.value)}>
                  {["qcow2", "raw", "vhd", "vhdx", "vmdk", "vdi", "iso"].map((f) => (
                    <option key={f} value={f}>
                      {f}
                    </option>
                  ))}
                </select>
              )}
            </Field>
          </>
        )}
        <div class="row">
          <Field label="Minimum disk (GB)" error={errors.minDisk}>
            {(a) => <input {...a} name="min_disk" inputMode="numeric" value={minDisk} onInput={(e) => setMinDisk(e.currentTarget.value)} />}
          </Field>
          {(source === "upload" || kind === "system") && (
            <Field label="Operating system" error={errors.os}>
              {(a) => (
                <select {...a} name="os_version" value={osVersion} onChange={(e) => setOsVersion(e.currentTarget.value)}>
                  <option value="">(detect / Other Linux)</option>
                  {osList.map((o) => (
                    <option key={o} value={o}>
                      {o}
                    </option>
                  ))}
                </select>
              )}
            </Field>
          )}
        </div>
        {progress && (
          <div class="upload-progress" data-testid="upload-progress">
            <Bar value={progress.total ? (100 * progress.sent) / progress.total : 0} label="Upload progress" />
            <span>
              {bytes(progress.sent)} of {bytes(progress.total)} sent
              {progress.sent >= progress.total ? " — the service is checking and storing the image…" : ""}
            </span>
          </div>
        )}
        {errors.form && <Notice kind="error">{errors.form}</Notice>}
        <Buttons busy={busy} submit={source === "bucket" ? "Import" : "Upload"} onCancel={props.onClose} />
      </form>
    </Modal>
  );
}

// ---- list -----------------------------------------------------------------------------------

type DialogKind = "replicate" | "share" | "export" | "delete";

export function useImageDialogs(reload: () => void) {
  const [dialog, setDialog] = useState<{ kind: DialogKind; image: Image } | null>(null);
  const [started, setStarted] = useState<Started | null>(null);
  const close = () => setDialog(null);
  const onStarted = (s: Started) => {
    setStarted(s);
    reload();
  };
  let node: ComponentChildren = null;
  if (dialog) {
    const p = { image: dialog.image, onClose: close, onStarted };
    node =
      dialog.kind === "replicate" ? (
        <ReplicateDialog {...p} />
      ) : dialog.kind === "share" ? (
        <ShareDialog {...p} />
      ) : dialog.kind === "export" ? (
        <ExportDialog {...p} />
      ) : (
        <DeleteDialog image={dialog.image} onClose={close} onDeleted={reload} />
      );
  }
  return { open: (kind: DialogKind, image: Image) => setDialog({ kind, image }), node, started, setStarted };
}

export function ImageActions(props: { image: Image; open: (k: DialogKind, i: Image) => void }) {
  const active = props.image.status === "active";
  const label = (verb: string) => `${verb} ${props.image.name}`;
  return (
    <span class="actions">
      <button type="button" disabled={!active} aria-label={label("Replicate")} onClick={() => props.open("replicate", props.image)}>
        Replicate
      </button>
      <button type="button" disabled={!active} aria-label={label("Share")} onClick={() => props.open("share", props.image)}>
        Share
      </button>
      <button type="button" disabled={!active} aria-label={label("Export")} onClick={() => props.open("export", props.image)}>
        Export
      </button>
      <button type="button" class="danger" aria-label={label("Delete")} onClick={() => props.open("delete", props.image)}>
        Delete
      </button>
    </span>
  );
}

export function PrivateImages() {
  const [images, setImages] = useState<Image[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [search, setSearch] = useState("");
  const [status, setStatus] = useState("");
  const [format, setFormat] = useState("");
  const [enc, setEnc] = useState("");
  const [importing, setImporting] = useState(false);
  const [uploaded, setUploaded] = useState(false);
  const load = () =>
    api.listPrivate().then(
      (l) => {
        setImages(l);
        setError(null);
      },
      (e) => setError(e.message),
    );
  const dialogs = useImageDialogs(load);
  useEffect(() => {
    load();
    // Images being created change state on their own: refresh while any is not final.
    const t = setInterval(() => {
      if (document.visibilityState === "visible") load();
    }, 3000);
    return () => clearInterval(t);
  }, []);

  const formats = useMemo(() => [...new Set((images ?? []).map((i) => i.disk_format).filter(Boolean))].sort(), [images]);
  const shown = (images ?? []).filter(
    (i) =>
      (!search || i.name.toLowerCase().includes(search.toLowerCase()) || i.id.startsWith(search.toLowerCase())) &&
      (!status || i.status === status) &&
      (!format || i.disk_format === format) &&
      (!enc || (enc === "yes") === isEncrypted(i)),
  );

  return (
    <section aria-labelledby="h-private">
      <div class="page-head">
        <h1 id="h-private">Private Images</h1>
        <button type="button" class="primary" onClick={() => setImporting(true)}>
          Register / Import image
        </button>
      </div>
      <JobStarted started={dialogs.started} />
      {uploaded && <Notice kind="ok">Upload finished: the image is stored and listed below.</Notice>}
      <form class="filters" role="search" aria-label="Filter images" onSubmit={(e) => e.preventDefault()}>
        <Field label="Search">
          {(a) => (
            <input {...a} type="search" name="search" placeholder="Name or ID" value={search} onInput={(e) => setSearch(e.currentTarget.value)} />
          )}
        </Field>
        <Field label="Status">
          {(a) => (
            <select {...a} name="status" value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
              <option value="">All</option>
              {["active", "queued", "saving", "killed"].map((s) => (
                <option key={s} value={s}>
                  {statusWord(s)}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field label="Format">
          {(a) => (
            <select {...a} name="format" value={format} onChange={(e) => setFormat(e.currentTarget.value)}>
              <option value="">All</option>
              {formats.map((f) => (
                <option key={f} value={f}>
                  {f}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field label="Encryption">
          {(a) => (
            <select {...a} name="encryption" value={enc} onChange={(e) => setEnc(e.currentTarget.value)}>
              <option value="">All</option>
              <option value="yes">Encrypted</option>
              <option value="no">Not encrypted</option>
            </select>
          )}
        </Field>
      </form>
      {error && <Notice kind="error">{error}</Notice>}
      {images === null ? (
        <p aria-busy="true">Loading…</p>
      ) : (
        <ImageTable images={shown} total={images.length} open={dialogs.open} />
      )}
      {dialogs.node}
      {importing && (
        <ImportDialog
          onClose={() => setImporting(false)}
          onStarted={(s) => {
            dialogs.setStarted(s);
            load();
          }}
          onUploaded={() => {
            setUploaded(true);
            load();
          }}
        />
      )}
    </section>
  );
}

function ImageTable(props: { images: Image[]; total: number; open: (k: DialogKind, i: Image) => void }) {
  return (
    <table class="list" data-testid="image-table">
      <caption>
        {props.images.length} of {props.total} images
      </caption>
      <thead>
        <tr>
          <th scope="col">Name</th>
          <th scope="col">Status</th>
          <th scope="col">Size</th>
          <th scope="col">Format</th>
          <th scope="col">Encryption</th>
          <th scope="col">Created</th>
          <th scope="col">
            <span class="sr-only">Actions</span>
          </th>
        </tr>
      </thead>
      <tbody>
        {props.images.length === 0 && (
          <tr>
            <td colSpan={7} class="empty">
              No images.
            </td>
          </tr>
        )}
        {props.images.map((i) => (
          <tr key={i.id} data-image-id={i.id} data-image-name={i.name}>
            <th scope="row">
              <a href={`#/images/${i.id}`}>{i.name}</a>
            </th>
            <td>
              <StatusBadge status={i.status} text={statusWord(i.status)} />
            </td>
            <td class="nowrap">{bytes(imageSize(i))}</td>
            <td>{i.disk_format ?? "—"}</td>
            <td>{isEncrypted(i) ? <span title={String(i.__system__cmkid)}>KMS encrypted</span> : "None"}</td>
            <td class="nowrap">{when(i.created_at)}</td>
            <td class="nowrap">
              <ImageActions image={i} open={props.open} />
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function ImageDetails(props: { id: string }) {
  const [img, setImg] = useState<Image | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [deleted, setDeleted] = useState(false);
  const load = () => api.image(props.id).then(setImg, (e) => setError(e.message));
  const dialogs = useImageDialogs(() => {
    load().then(() => {});
  });
  useEffect(() => {
    load();
  }, [props.id]);
  if (deleted) return <Notice kind="ok">The image was deleted. <a href="#/images">Back to Private Images</a></Notice>;
  if (error) return <Notice kind="error">{error}</Notice>;
  if (!img) return <p aria-busy="true">Loading…</p>;
  const own = img.owner === currentSession()!.projectId;
  const rows: [string, ComponentChildren][] = [
    ["ID", <code>{img.id}</code>],
    ["Status", <StatusBadge status={img.status} text={statusWord(img.status)} />],
    ["Size", bytes(imageSize(img))],
    ["Virtual size", bytes(img.virtual_size ?? null)],
    ["Disk format", img.disk_format ?? "—"],
    ["Encryption", isEncrypted(img) ? <>KMS key <code>{String(img.__system__cmkid)}</code></> : "None"],
    ["Operating system", img.__os_version ?? "—"],
    ["Type", img.virtual_env_type === "DataImage" ? "Data disk" : "System disk"],
    ["Minimum disk", `${img.min_disk ?? 0} GB`],
    ["Visibility", img.visibility],
    ["Owner project", <code>{img.owner}</code>],
    ["Protected", img.protected ? "Yes" : "No"],
    ["Created", when(img.created_at)],
    ["Updated", when(img.updated_at)],
    ["Description", img.__description || "—"],
    ["Tags", (img.tags ?? []).join(", ") || "—"],
  ];
  return (
    <section aria-labelledby="h-details">
      <p>
        <a href="#/images">← Private Images</a>
      </p>
      <div class="page-head">
        <h1 id="h-details">{img.name}</h1>
        {own && (
          <ImageActions
            image={img}
            open={(k, i) => {
              if (k === "delete") {
                dialogs.open(k, i);
              } else dialogs.open(k, i);
            }}
          />
        )}
      </div>
      <JobStarted started={dialogs.started} />
      <dl class="details">
        {rows.map(([k, v]) => (
          <div key={k}>
            <dt>{k}</dt>
            <dd>{v}</dd>
          </div>
        ))}
      </dl>
      {dialogs.node && dialogs.node}
      {/* After a delete from the details page there is nothing left to show. */}
      <DeletedWatcher id={img.id} onGone={() => setDeleted(true)} active={!!dialogs.node} />
    </section>
  );
}

/** Notices when the image shown disappeared (deleted from its own page). */
function DeletedWatcher(props: { id: string; onGone: () => void; active: boolean }) {
  useEffect(() => {
    if (props.active) return;
    api.image(props.id).catch((e) => {
      if (e instanceof ApiError && e.status === 404) props.onGone();
    });
  }, [props.active]);
  return null;
}
