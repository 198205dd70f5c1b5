// Usage: the project's logical vs billable bytes (GET /v1/cloudimages/usage) and its quotas.
import { useEffect, useState } from "preact/hooks";
import { api } from "./api";
import { Notice } from "./components";
import { bytes } from "./format";

export function UsagePage() {
  const [u, setU] = useState<Record<string, any> | null>(null);
  const [q, setQ] = useState<{ type: string; used: number; quota: number }[]>([]);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    api.usage().then(setU, (e) => setError(e.message));
    api.quota().then((r) => setQ(r.quotas.resources), () => {});
  }, []);
  const QUOTA_WORDS: Record<string, string> = {
    image: "Private images",
    image_shared: "Images shared",
    image_member: "Share recipients",
  };
  return (
    <section aria-labelledby="h-usage">
      <h1 id="h-usage">Usage</h1>
      {error && <Notice kind="error">{error}</Notice>}
      {!u ? (
        !error && <p aria-busy="true">Loading…</p>
      ) : (
        <>
          <dl class="cards" data-testid="usage">
            <div>
              <dt>Logical size</dt>
              <dd data-testid="logical-bytes" data-bytes={u.logical_bytes}>
                {bytes(u.logical_bytes)}
              </dd>
              <small>What your images hold, each counted in full.</small>
            </div>
            <div>
              <dt>Billable size</dt>
              <dd data-testid="billable-bytes" data-bytes={u.billable_bytes}>
                {bytes(u.billable_bytes)}
              </dd>
              <small>Distinct stored data: shared chunks and zeros are not counted twice.</small>
            </div>
            <div>
              <dt>Saved</dt>
              <dd data-testid="saved-bytes">{bytes(u.saved_bytes)}</dd>
              <small>
                {u.logical_bytes ? `${((100 * (u.saved_bytes ?? 0)) / u.logical_bytes).toFixed(0)}% less than logical` : "—"}
              </small>
            </div>
            <div>
              <dt>Images</dt>
              <dd data-testid="image-count">{u.images}</dd>
              <small>{u.images_with_data} with data</small>
            </div>
          </dl>
          {u.cross_project_policy && <p class="hint">Billing rule: {String(u.cross_project_policy)}.</p>}
        </>
      )}
      {q.length > 0 && (
        <table class="list narrow">
          <caption>Quotas</caption>
          <thead>
            <tr>
              <th scope="col">Resource</th>
              <th scope="col">Used</th>
              <th scope="col">Quota</th>
            </tr>
          </thead>
          <tbody>
            {q.map((r) => (
              <tr key={r.type}>
                <th scope="row">{QUOTA_WORDS[r.type] ?? r.type}</th>
                <td>{r.used}</td>
                <td>{r.quota}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
