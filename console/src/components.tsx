// Small accessible building blocks: labelled fields with their error next to them, modal
// dialogs (native <dialog>: focus stays inside, Esc closes), progress bars and live notices.
import type { ComponentChildren, JSX } from "preact";
import { useEffect, useId, useRef } from "preact/hooks";

export function Field(props: {
  label: string;
  error?: string | null;
  hint?: string;
  children: (attrs: { id: string; "aria-invalid": boolean; "aria-describedby"?: string }) => JSX.Element;
}) {
  const id = useId();
  const errId = `${id}-err`;
  const hintId = `${id}-hint`;
  const described = [props.error ? errId : "", props.hint ? hintId : ""].filter(Boolean).join(" ") || undefined;
  return (
    <div class={`field${props.error ? " invalid" : ""}`}>
      <label for={id}>{props.label}</label>
      {props.children({ id, "aria-invalid": Boolean(props.error), "aria-describedby": described })}
      {props.hint && (
        <small id={hintId} class="hint">
          {props.hint}
        </small>
      )}
      {props.error && (
        <p id={errId} class="field-error" role="alert" data-testid="field-error">
          {props.error}
        </p>
      )}
    </div>
  );
}

export function Modal(props: { title: string; onClose: () => void; children: ComponentChildren; wide?: boolean }) {
  const ref = useRef<HTMLDialogElement>(null);
  const titleId = useId();
  useEffect(() => {
    const d = ref.current!;
    // Focus goes back to whatever opened the dialog when it goes away.
    const opener = document.activeElement as HTMLElement | null;
    if (!d.open) d.showModal();
    const cancel = (e: Event) => {
      e.preventDefault();
      props.onClose();
    };
    d.addEventListener("cancel", cancel);
    return () => {
      d.removeEventListener("cancel", cancel);
      if (d.open) d.close();
      if (opener && opener.isConnected) setTimeout(() => opener.focus(), 0);
    };
  }, []);
  return (
    <dialog ref={ref} aria-labelledby={titleId} class={props.wide ? "wide" : ""}>
      <header class="dialog-head">
        <h2 id={titleId}>{props.title}</h2>
        <button type="button" class="icon" aria-label="Close" onClick={props.onClose}>
          ×
        </button>
      </header>
      {props.children}
    </dialog>
  );
}

export function Bar(props: { value: number; label: string }) {
  const v = Math.max(0, Math.min(100, props.value));
  return (
    <span class="bar">
      <progress max={100} value={v} aria-label={props.label} />
      <span class="bar-num">{v.toFixed(0)}%</span>
    </span>
  );
}

export function Notice(props: { kind: "error" | "ok" | "info"; children: ComponentChildren }) {
  return (
    <div class={`notice ${props.kind}`} role={props.kind === "error" ? "alert" : "status"}>
      {props.children}
    </div>
  );
}

export function StatusBadge(props: { status: string; text?: string }) {
  return <span class={`badge s-${props.status.toLowerCase()}`}>{props.text ?? props.status}</span>;
}
