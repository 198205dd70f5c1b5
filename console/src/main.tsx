// The console shell: sign-in, navigation (hash routes) and the pages.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, currentSession, setSession, setUnauthorizedHandler, signIn } from "./api";
import { Field, Notice } from "./components";
import { ImageDetails, PrivateImages } from "./images";
import { JobsPage } from "./jobs";
import { KeysPage } from "./keys";
import { SharedImages } from "./shared";
import { UsagePage } from "./usage";
import "./style.css";

const PAGES = [
  { path: "images", title: "Private Images" },
  { path: "shared", title: "Images Shared with Me" },
  { path: "jobs", title: "Jobs" },
  { path: "usage", title: "Usage" },
  { path: "keys", title: "Keys" },
];

function useHash(): string {
  const [h, setH] = useState(location.hash.replace(/^#\/?/, ""));
  useEffect(() => {
    const f = () => setH(location.hash.replace(/^#\/?/, ""));
    addEventListener("hashchange", f);
    return () => removeEventListener("hashchange", f);
  }, []);
  return h;
}

function SignIn(props: { onDone: () => void; expired: boolean }) {
  const [user, setUser] = useState("");
  const [password, setPassword] = useState("");
  const [domain, setDomain] = useState("default");
  const [project, setProject] = useState("");
  const [errors, setErrors] = useState<Record<string, string | null>>({});
  const [failure, setFailure] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  async function submit(e: Event) {
    e.preventDefault();
    const errs = {
      user: user.trim() ? null : "Enter your user name.",
      password: password ? null : "Enter your password.",
      domain: domain.trim() ? null : "Enter your domain (account) name.",
    };
    setErrors(errs);
    if (Object.values(errs).some(Boolean)) return;
    setBusy(true);
    setFailure(null);
    try {
      const s = await signIn("", user.trim(), password, domain.trim(), project.trim() || domain.trim());
      setSession(s);
      props.onDone();
    } catch (err) {
      setFailure(err instanceof ApiError ? err.message : String(err));
    } finally {
      setBusy(false);
    }
  }

  return (
    <main class="signin">
      <h1>OpenIMS console</h1>
      <form onSubmit={submit} noValidate aria-label="Sign in">
        {props.expired && <Notice kind="info">Your session has ended. Sign in again.</Notice>}
        <Field label="User name" error={errors.user}>
          {(a) => <input {...a} name="user" autoComplete="username" value={user} onInput={(e) => setUser(e.currentTarget.value)} />}
        </Field>
        <Field label="Password" error={errors.password}>
          {(a) => (
            <input
              {...a}
              name="password"
              type="password"
              autoComplete="current-password"
              value={password}
              onInput={(e) => setPassword(e.currentTarget.value)}
            />
          )}
        </Field>
        <Field label="Domain" error={errors.domain}>
          {(a) => <input {...a} name="domain" value={domain} onInput={(e) => setDomain(e.currentTarget.value)} />}
        </Field>
        <Field label="Project" hint="Project name; empty means the project named like the domain.">
          {(a) => <input {...a} name="project" value={project} onInput={(e) => setProject(e.currentTarget.value)} />}
        </Field>
        {failure && <Notice kind="error">{failure}</Notice>}
        <button type="submit" class="primary" disabled={busy}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}

function App() {
  const [session, setS] = useState(currentSession());
  const [expired, setExpired] = useState(false);
  const hash = useHash();
  useEffect(() => {
    setUnauthorizedHandler(() => {
      setSession(null);
      setExpired(true);
      setS(null);
    });
  }, []);
  if (!session) {
    return (
      <SignIn
        expired={expired}
        onDone={() => {
          setExpired(false);
          setS(currentSession());
          if (!location.hash) location.hash = "#/images";
        }}
      />
    );
  }
  const [page, ...rest] = (hash || "images").split("/");
  const signOut = () => {
    fetch("/v3/auth/tokens", {
      method: "DELETE",
      headers: { "X-Auth-Token": session.token, "X-Subject-Token": session.token },
    }).catch(() => {});
    setSession(null);
    setS(null);
  };
  let body;
  switch (page) {
    case "shared":
      body = <SharedImages />;
      break;
    case "jobs":
      body = <JobsPage />;
      break;
    case "usage":
      body = <UsagePage />;
      break;
    case "keys":
      body = <KeysPage />;
      break;
    default:
      body = rest[0] ? <ImageDetails id={decodeURIComponent(rest[0])} /> : <PrivateImages />;
  }
  return (
    <div class="shell">
      <a class="skip" href="#content" onClick={(e) => { e.preventDefault(); document.getElementById("content")?.focus(); }}>
        Skip to content
      </a>
      <header class="top">
        <span class="brand">OpenIMS</span>
        <span class="who" data-testid="who">
          {session.userName} · project <strong>{session.projectName}</strong>{" "}
          <code title="Project ID">{session.projectId}</code>
        </span>
        <button type="button" onClick={signOut}>
          Sign out
        </button>
      </header>
      <nav aria-label="Pages">
        <ul>
          {PAGES.map((p) => (
            <li key={p.path}>
              <a href={`#/${p.path}`} aria-current={(page || "images") === p.path ? "page" : undefined}>
                {p.title}
              </a>
            </li>
          ))}
        </ul>
      </nav>
      <main id="content" tabIndex={-1}>
        {body}
      </main>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
