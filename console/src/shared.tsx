// Images Shared with Me: pending / accepted / rejected tabs with Accept and Reject. Accepting
// or rejecting is a job (batch_update_members); the tab refreshes when it ends.
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, Image, waitJob } from "./api";
import { Notice, StatusBadge } from "./components";
import { bytes, imageSize, isEncrypted, jobError, statusWord, when } from "./format";
import { JobStarted, ReplicateDialog, Started } from "./images";

const TABS = [
  { id: "pending", title: "Pending" },
  { id: "accepted", title: "Accepted" },
  { id: "rejected", title: "Rejected" },
] as const;

export function SharedImages() {
  const [tab, setTab] = useState<(typeof TABS)[number]["id"]>("pending");
  const [images, setImages] = useState<Image[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [message, setMessage] = useState<string | null>(null);
  const [busy, setBusy] = useState<string | null>(null);
  const [replicate, setReplicate] = useState<Image | null>(null);
  const [started, setStarted] = useState<Started | null>(null);
  const load = (t = tab) => {
    setImages(null);
    return api.listShared(t).then(
      (l) => {
        setImages(l);
        setError(null);
      },
      (e) => {
        setImages([]);
        setError(e.message);
      },
    );
  };
  useEffect(() => {
    load(tab);
  }, [tab]);

  async function answer(img: Image, status: "accepted" | "rejected") {
    setBusy(img.id);
    setMessage(null);
    setError(null);
    try {
      const r = await api.answerShare([img.id], status);
      const j = await waitJob(r.job_id, 60_000);
      if (j.status === "SUCCESS") setMessage(`${img.name} was ${status}.`);
      else setError(jobError(j) ?? `The job is still ${j.status}.`);
      await load();
    } catch (e) {
      setError(e instanceof ApiError ? e.message : String(e));
    } finally {
      setBusy(null);
    }
  }

  function onKey(e: KeyboardEvent, i: number) {
    // Arrow keys move between tabs (WAI-ARIA tabs pattern).
    const d = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
    if (!d) return;
    const next = TABS[(i + d + TABS.length) % TABS.length];
    setTab(next.id);
    document.getElementById(`tab-${next.id}`)?.focus();
  }

  return (
    <section aria-labelledby="h-shared">
      <h1 id="h-shared">Images Shared with Me</h1>
      <div role="tablist" aria-label="Share status" class="tabs">
        {TABS.map((t, i) => (
          <button
            key={t.id}
            id={`tab-${t.id}`}
            role="tab"
            type="button"
            aria-selected={tab === t.id}
            aria-controls="shared-panel"
            tabIndex={tab === t.id ? 0 : -1}
            onClick={() => setTab(t.id)}
            onKeyDown={(e) => onKey(e as unknown as KeyboardEvent, i)}
          >
            {t.title}
          </button>
        ))}
      </div>
      <div id="shared-panel" role="tabpanel" aria-labelledby={`tab-${tab}`}>
        {message && <Notice kind="ok">{message}</Notice>}
        <JobStarted started={started} />
        {error && <Notice kind="error">{error}</Notice>}
        {images === null ? (
          <p aria-busy="true">Loading…</p>
        ) : (
          <table class="list" data-testid="shared-table">
            <caption>
              {images.length} {tab} image{images.length === 1 ? "" : "s"}
            </caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Status</th>
                <th scope="col">Size</th>
                <th scope="col">Format</th>
                <th scope="col">Encryption</th>
                <th scope="col">Owner project</th>
                <th scope="col">Created</th>
                <th scope="col">
                  <span class="sr-only">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {images.length === 0 && (
                <tr>
                  <td colSpan={8} class="empty">
                    No {tab} images.
                  </td>
                </tr>
              )}
              {images.map((i) => (
                <tr key={i.id} data-image-id={i.id} data-image-name={i.name}>
                  <th scope="row">{i.name}</th>
                  <td>
                    <StatusBadge status={i.status} text={statusWord(i.status)} />
                  </td>
                  <td>{bytes(imageSize(i))}</td>
                  <td>{i.disk_format ?? "—"}</td>
                  <td>{isEncrypted(i) ? "KMS encrypted" : "None"}</td>
                  <td>
                    <code>{i.owner}</code>
                  </td>
                  <td>{when(i.created_at)}</td>
                  <td class="actions">
                    {tab !== "accepted" && (
                      <button type="button" class="primary" disabled={busy === i.id} aria-label={`Accept ${i.name}`} onClick={() => answer(i, "accepted")}>
                        Accept
                      </button>
                    )}
                    {tab !== "rejected" && (
                      <button type="button" disabled={busy === i.id} aria-label={`Reject ${i.name}`} onClick={() => answer(i, "rejected")}>
                        Reject
                      </button>
                    )}
                    {tab === "accepted" && (
                      <button type="button" aria-label={`Replicate ${i.name}`} disabled={i.status !== "active"} onClick={() => setReplicate(i)}>
                        Replicate
                      </button>
                    )}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </div>
      {replicate && <ReplicateDialog image={replicate} onClose={() => setReplicate(null)} onStarted={setStarted} />}
    </section>
  );
}
