// Keys (KMS): list, create, enable and disable the project's keys.
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, KmsKey } from "./api";
import { Field, Notice, StatusBadge } from "./components";
import { when } from "./format";

const STATES: Record<string, [string, string]> = {
  "1": ["Pending creation", "init"],
  "2": ["Enabled", "success"],
  "3": ["Disabled", "fail"],
  "4": ["Pending deletion", "fail"],
  "5": ["Pending import", "init"],
};

export function checkAlias(v: string): string | null {
  if (!v.trim()) return "Enter a name (alias) for the key.";
  if (v.length > 255) return "The alias can be at most 255 characters long.";
  if (!/^[A-Za-z0-9:/_-]+$/.test(v)) return "Use only letters, digits, colons (:), slashes (/), underscores (_) and hyphens (-).";
  return null;
}

export function KeysPage() {
  const [keys, setKeys] = useState<KmsKey[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [message, setMessage] = useState<string | null>(null);
  const [alias, setAlias] = useState("");
  const [desc, setDesc] = useState("");
  const [aliasError, setAliasError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const load = () => api.keys().then(setKeys, (e) => setError(e.message));
  useEffect(() => {
    load();
  }, []);

  async function create(e: Event) {
    e.preventDefault();
    const err = checkAlias(alias);
    setAliasError(err);
    if (err) return;
    setBusy(true);
    setMessage(null);
    try {
      await api.createKey(alias, desc);
      setMessage(`Key ${alias} created.`);
      setAlias("");
      setDesc("");
      await load();
    } catch (e) {
      const m = e instanceof ApiError ? e.message : String(e);
      if (/alias/i.test(m)) setAliasError(m);
      else setError(m);
    } finally {
      setBusy(false);
    }
  }

  async function toggle(k: KmsKey) {
    setError(null);
    setMessage(null);
    try {
      if (k.key_state === "2") await api.disableKey(k.key_id);
      else await api.enableKey(k.key_id);
      setMessage(`Key ${k.key_alias} ${k.key_state === "2" ? "disabled" : "enabled"}.`);
      await load();
    } catch (e) {
      setError(e instanceof ApiError ? e.message : String(e));
    }
  }

  return (
    <section aria-labelledby="h-keys">
      <h1 id="h-keys">Keys</h1>
      <form class="inline-form" onSubmit={create} noValidate aria-label="Create a key">
        <Field label="Key alias" error={aliasError}>
          {(a) => <input {...a} name="key_alias" value={alias} onInput={(e) => setAlias(e.currentTarget.value)} />}
        </Field>
        <Field label="Description (optional)">
          {(a) => <input {...a} name="key_description" value={desc} onInput={(e) => setDesc(e.currentTarget.value)} />}
        </Field>
        <button type="submit" class="primary" disabled={busy}>
          Create key
        </button>
      </form>
      {message && <Notice kind="ok">{message}</Notice>}
      {error && <Notice kind="error">{error}</Notice>}
      {keys === null ? (
        !error && <p aria-busy="true">Loading…</p>
      ) : (
        <table class="list" data-testid="keys-table">
          <caption>{keys.length} keys</caption>
          <thead>
            <tr>
              <th scope="col">Alias</th>
              <th scope="col">Key ID</th>
              <th scope="col">State</th>
              <th scope="col">Spec</th>
              <th scope="col">Created</th>
              <th scope="col">
                <span class="sr-only">Actions</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {keys.length === 0 && (
              <tr>
                <td colSpan={6} class="empty">
                  No keys yet.
                </td>
              </tr>
            )}
            {keys.map((k) => {
              const [word, cls] = STATES[k.key_state] ?? [k.key_state, "init"];
              const created = /^\d+$/.test(k.creation_date) ? new Date(Number(k.creation_date)).toISOString() : k.creation_date;
              return (
                <tr key={k.key_id} data-key-alias={k.key_alias} data-key-state={k.key_state}>
                  <th scope="row">{k.key_alias}</th>
                  <td>
                    <code>{k.key_id}</code>
                  </td>
                  <td>
                    <StatusBadge status={cls} text={word} />
                  </td>
                  <td>{k.key_spec}</td>
                  <td>{when(created)}</td>
                  <td>
                    {(k.key_state === "2" || k.key_state === "3") && (
                      <button type="button" aria-label={`${k.key_state === "2" ? "Disable" : "Enable"} ${k.key_alias}`} onClick={() => toggle(k)}>
                        {k.key_state === "2" ? "Disable" : "Enable"}
                      </button>
                    )}
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
    </section>
  );
}
