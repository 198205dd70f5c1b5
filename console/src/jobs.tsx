// Jobs: the project's jobs, refreshed every second while any is queued or running, with
// progress bars, throughput, ETA, queue position and failures in plain words.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, Job } from "./api";
import { Bar, Notice, StatusBadge } from "./components";
import { bytes, duration, jobError, jobWord, when } from "./format";

const STATUS_WORDS: Record<string, string> = {
  INIT: "Queued",
  RUNNING: "Running",
  SUCCESS: "Succeeded",
  FAIL: "Failed",
};

export function JobsPage() {
  const [jobs, setJobs] = useState<Job[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const timer = useRef<number | undefined>();
  useEffect(() => {
    let stopped = false;
    const tick = async () => {
      try {
        const l = await api.jobs();
        if (stopped) return;
        setJobs(l);
        setError(null);
        const live = l.some((j) => j.status === "INIT" || j.status === "RUNNING");
        timer.current = window.setTimeout(tick, live ? 1000 : 5000);
      } catch (e) {
        if (stopped) return;
        setError((e as Error).message);
        timer.current = window.setTimeout(tick, 5000);
      }
    };
    tick();
    return () => {
      stopped = true;
      clearTimeout(timer.current);
    };
  }, []);

  return (
    <section aria-labelledby="h-jobs">
      <h1 id="h-jobs">Jobs</h1>
      {error && <Notice kind="error">{error}</Notice>}
      {jobs === null ? (
        <p aria-busy="true">Loading…</p>
      ) : (
        <table class="list" data-testid="jobs-table">
          <caption>{jobs.length} most recent jobs (refreshed automatically)</caption>
          <thead>
            <tr>
              <th scope="col">Job</th>
              <th scope="col">Image</th>
              <th scope="col">Status</th>
              <th scope="col">Progress</th>
              <th scope="col">Throughput</th>
              <th scope="col">Time left</th>
              <th scope="col">Started</th>
              <th scope="col">Details</th>
            </tr>
          </thead>
          <tbody aria-live="polite">
            {jobs.length === 0 && (
              <tr>
                <td colSpan={8} class="empty">
                  No jobs yet.
                </td>
              </tr>
            )}
            {jobs.map((j) => {
              const e = j.entities ?? {};
              const pct = j.status === "SUCCESS" ? 100 : Number(e.process_percent ?? 0);
              const err = jobError(j);
              return (
                <tr key={j.job_id} data-job-id={j.job_id} data-job-status={j.status} data-job-type={j.job_type}>
                  <th scope="row">
                    {jobWord(j.job_type)}
                    <br />
                    <code class="small" title={j.job_id}>
                      {j.job_id.slice(0, 12)}…
                    </code>
                  </th>
                  <td>{e.image_name ?? (e.image_id ? <code>{e.image_id}</code> : "—")}</td>
                  <td>
                    <StatusBadge status={j.status} text={STATUS_WORDS[j.status] ?? j.status} />
                  </td>
                  <td>
                    <Bar value={pct} label={`Progress of ${jobWord(j.job_type)} ${j.job_id}`} />
                    {e.bytes_total ? (
                      <small class="block">
                        {bytes(e.bytes_done ?? 0)} of {bytes(e.bytes_total)}
                      </small>
                    ) : null}
                  </td>
                  <td>{e.throughput_bytes_per_second ? `${bytes(e.throughput_bytes_per_second)}/s` : "—"}</td>
                  <td>
                    {j.status === "INIT" && e.queue_position !== null && e.queue_position !== undefined
                      ? e.queue_position === 0
                        ? "Next in queue"
                        : `${e.queue_position} ahead in queue`
                      : duration(e.eta_seconds)}
                  </td>
                  <td>{when(j.begin_time)}</td>
                  <td class="job-detail">
                    {err ? (
                      <span class="error-text" data-testid="job-error">
                        {err}
                      </span>
                    ) : j.status === "SUCCESS" ? (
                      j.end_time ? `Finished ${when(j.end_time)}` : "Finished"
                    ) : (
                      e.current_task ?? ""
                    )}
                    {j.status === "SUCCESS" && e.image_id && j.job_type !== "imsNativeExportImageJob" && (
                      <>
                        {" "}
                        <a href={`#/images/${e.image_id}`}>Open image</a>
                      </>
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
