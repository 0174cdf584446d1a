// The playground: a prompt sent to the server's own /v1/completions (streaming, logprobs 5), each token
// shown as it arrives and shaded by the probability the model gave it, its alternatives on hover.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = null; // asked for when the server answers 401; kept in this page's memory only
let controller = null; // the running request's AbortController: Stop aborts it, and the server cancels it

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function askForKey(message) {
  $("key-row").hidden = false;
  status(message, true);
  $("key").focus();
}

async function loadModel() {
  const r = await fetch("/props", { headers: headers() });
  if (r.status === 401) return askForKey("This server needs an API key: enter it, then send.");
  const p = await r.json();
  $("model").textContent = `${p.model} · ${p.variant} · ${(p.parameters / 1e6).toFixed(2)}M parameters · ` +
    `${p.tokenizer} tokenizer, ${p.vocab_size} tokens · context ${p.block_size} tokens`;
}

function request() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const stop = $("stop").value.replace(/\\n/g, "\n");
  return {
    prompt: $("prompt").value, max_tokens: number("max_tokens"), temperature: number("temperature"),
    top_k: number("top_k"), top_p: number("top_p"), seed: number("seed"), stop: stop ? [stop] : undefined,
    logprobs: 5, stream: true, stream_options: { include_usage: true },
  };
}

// One chunk's text as a span: its token's probability as the shade, the alternatives as a tooltip.
function render(choice) {
  const lp = choice.logprobs;
  if (!choice.text && !(lp && lp.tokens.length)) return;
  const span = document.createElement("span");
  span.textContent = choice.text;
  if (lp && lp.tokens.length) {
    const logprob = lp.token_logprobs.reduce((a, b) => a + b, 0);
    span.className = "token";
    span.tabIndex = 0;
    span.dataset.logprob = String(logprob);
    span.style.setProperty("--p", Math.exp(logprob).toFixed(4));
    const top = Object.entries(lp.top_logprobs[0] || {}).sort((a, b) => b[1] - a[1]).slice(0, 5);
    span.dataset.alternatives = top.map(([t, l]) => `${JSON.stringify(t)}  ${(100 * Math.exp(l)).toFixed(1)}%`)
      .join("\n");
    span.setAttribute("aria-label", `${JSON.stringify(choice.text)}, probability ` +
      `${(100 * Math.exp(logprob)).toFixed(1)}%`);
  }
  $("output").appendChild(span);
}

async function send() {
  if (controller) return;
  if (!$("key-row").hidden && $("key").value) apiKey = $("key").value;
  const output = $("output");
  output.textContent = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt-text";
  prompt.textContent = $("prompt").value;
  output.appendChild(prompt);
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-button").disabled = false;
  status("generating…");
  const sent = performance.now();
  let first = null, tokens = 0, usage = null;
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(request()),
                                                signal: controller.signal });
    if (r.status === 401) {
      apiKey = null;
      return askForKey("Wrong or missing API key: enter this server's key (kept in this page only) and send again.");
    }
    if (!r.ok) return status((await r.json()).error.message, true);
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: {")) continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) { status(chunk.error.message, true); continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          render(choice);
          tokens += choice.logprobs ? choice.logprobs.tokens.length : 0;
          if (first === null && choice.text) {
            first = performance.now() - sent;
            document.body.dataset.firstTokenMs = first.toFixed(1);
          }
        }
      }
    }
    const seconds = (performance.now() - sent) / 1000;
    status(`${usage ? usage.completion_tokens : tokens} tokens in ${seconds.toFixed(2)} s · first token after ` +
      `${first === null ? "-" : first.toFixed(0)} ms`);
  } catch (e) {
    status(e.name === "AbortError" ? `stopped after ${tokens} tokens` : String(e), e.name !== "AbortError");
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop-button").disabled = true;
  }
}

function stop() {
  if (controller) controller.abort();
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("stop-button").addEventListener("click", stop);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
$("key").addEventListener("change", () => { apiKey = $("key").value || null; loadModel(); });
loadModel();
