// ruyi-trt serve's page: submit a job, follow its progress (server-sent events read with fetch, so the bearer
// token can be sent), play the video when done, list the queue. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("ruyi-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("ruyi-token", tokenInput.value));

function headers() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function describe(job) {
  if (job.state === "queued") return "queued, waiting for a worker";
  if (job.state === "running") {
    const stage = job.stage ? `${job.stage} ${job.done}/${job.total}` : "starting";
    return `running: ${stage} (step ${job.step}/${job.steps}), ${job.seconds.toFixed(1)} s`;
  }
  if (job.state === "done") return `done in ${job.seconds.toFixed(1)} s`;
  return `${job.state}${job.error ? ": " + job.error : ""}`;
}

let current = null;

function showJob(job) {
  $("job-id").textContent = job.id;
  $("status").textContent = describe(job);
  $("status").className = `state-${job.state}`;
  const bar = $("progress");
  if (job.state === "done") { bar.max = 1; bar.value = 1; }
  else if (job.total > 0) { bar.max = job.total; bar.value = job.done; }
}

async function follow(jobId) {
  current = jobId;
  $("video").hidden = true;
  $("download").hidden = true;
  const response = await api(`/v1/jobs/${jobId}/events`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (!data || current !== jobId) continue;
      last = JSON.parse(data);
      if (last.id) showJob(last);
    }
  }
  refreshQueue();
  if (last && last.state === "done" && current === jobId) await showVideo(last);
}

async function showVideo(job) {
  const blob = await (await api(job.video)).blob();
  const url = URL.createObjectURL(blob);
  const video = $("video");
  video.src = url;
  video.hidden = false;
  video.play().catch(() => { /* autoplay may be refused; the controls remain */ });
  const link = $("download");
  link.href = url;
  link.download = `ruyi-${job.id}.mp4`;
  link.hidden = false;
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("form-error").textContent = "";
  const form = new FormData();
  for (const file of $("image").files) form.append("image", file);
  for (const file of $("end_image").files) form.append("end_image", file);
  for (const name of ["frames", "resolution", "size", "camera", "motion", "steps", "cfg", "seed", "scheduler"]) {
    const value = $(name).value.trim();
    if (value) form.append(name, value);
  }
  $("submit").disabled = true;
  try {
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    showJob(job);
    refreshQueue();
    follow(job.id).catch((e) => { $("status").textContent = `lost the progress stream: ${e.message}`; });
  } catch (e) {
    $("form-error").textContent = e.message;
  } finally {
    $("submit").disabled = false;
  }
});

async function cancel(jobId) {
  try { await api(`/v1/jobs/${jobId}`, { method: "DELETE" }); } catch (e) { $("form-error").textContent = e.message; }
  refreshQueue();
}

async function refreshQueue() {
  try {
    const { jobs, counts } = await (await api("/v1/jobs?limit=50")).json();
    $("counts").textContent = Object.entries(counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ");
    const body = $("queue").querySelector("tbody");
    body.replaceChildren(...jobs.reverse().map((job) => {
      const row = document.createElement("tr");
      const cells = [job.id.slice(0, 8), job.state, job.total ? `${job.stage} ${job.done}/${job.total}` : "",
                     job.seconds.toFixed(1)];
      for (const text of cells) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.appendChild(cell);
      }
      row.children[1].className = `state-${job.state}`;
      const action = document.createElement("td");
      if (job.state === "queued" || job.state === "running") {
        const button = document.createElement("button");
        button.textContent = "cancel";
        button.onclick = () => cancel(job.id);
        action.appendChild(button);
      } else if (job.state === "done") {
        const link = document.createElement("a");
        link.href = "#";
        link.textContent = "show";
        link.onclick = (e) => { e.preventDefault(); current = job.id; showJob(job); showVideo(job); };
        action.appendChild(link);
      }
      row.appendChild(action);
      return row;
    }));
    const health = await (await api("/healthz")).json();
    $("health").textContent = `${health.workers.filter((w) => w.state === "ready" || w.state === "busy").length}` +
      `/${health.workers.length} workers ready`;
  } catch (e) {
    $("counts").textContent = e.message;
  }
}

refreshQueue();
setInterval(refreshQueue, 2000);
