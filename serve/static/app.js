// The playground: a prompt sent to the server's own /v1/completions (streaming, logprobs 5), each token
// shown as it arrives and shaded by the probability the model gave it, its alternatives on hover. A model
// with a chat template gets a chat view too: the conversation goes to /v1/chat/completions, and each
// answer is shown the same way, token by token.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = null; // asked for when the server answers 401; kept in this page's memory only
let controller = null; // the running request's AbortController: Stop aborts it, and the server cancels it
let messages = []; // the chat view's conversation so far
const chatting = () => $("chat-mode").checked;

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
  $("mode-row").hidden = !p.chat;
}

function setMode() {
  $("prompt-label").textContent = chatting() ? "Your turn" : "Prompt";
  $("new-chat").hidden = !chatting();
  if (chatting() && $("prompt").value === "ROMEO:") $("prompt").value = "";
  newChat();
}

function newChat() {
  messages = [];
  $("output").textContent = "";
  status("");
}

// A turn of the conversation as a block: the user's text, or the container an answer streams into.
function turn(role, text = "") {
  const block = document.createElement("span");
  block.className = `turn ${role}`;
  block.dataset.role = role;
  block.textContent = text;
  $("output").appendChild(block);
  return block;
}

function request() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const stop = $("stop").value.replace(/\\n/g, "\n");
  const common = {
    max_tokens: number("max_tokens"), temperature: number("temperature"), top_k: number("top_k"),
    top_p: number("top_p"), seed: number("seed"), stop: stop ? [stop] : undefined, stream: true,
    stream_options: { include_usage: true },
  };
  if (chatting()) return { ...common, messages, logprobs: true, top_logprobs: 5 };
  return { ...common, prompt: $("prompt").value, logprobs: 5 };
}

// A chunk's choice as [text, [logprob, alternatives] per token]: completions and chat say it differently.
function pieces(choice) {
  if (choice.delta) {
    const entries = (choice.logprobs && choice.logprobs.content) || [];
    return [choice.delta.content || "",
            entries.map((e) => [e.logprob, e.top_logprobs.map((t) => [t.token, t.logprob])])];
  }
  const lp = choice.logprobs;
  if (!lp) return [choice.text, []];
  return [choice.text, lp.tokens.map((_, i) => [lp.token_logprobs[i], Object.entries(lp.top_logprobs[i] || {})])];
}

// One chunk's text as a span: its token's probability as the shade, the alternatives as a tooltip.
function render(text, tokens, into) {
  if (!text && !tokens.length) return;
  const span = document.createElement("span");
  span.textContent = text;
  if (tokens.length) {
    const logprob = tokens.reduce((a, [l]) => a + l, 0);
    span.className = "token";
    span.tabIndex = 0;
    span.dataset.logprob = String(logprob);
    span.style.setProperty("--p", Math.exp(logprob).toFixed(4));
    const top = [...tokens[0][1]].sort((a, b) => b[1] - a[1]).slice(0, 5);
    span.dataset.alternatives = top.map(([t, l]) => `${JSON.stringify(t)}  ${(100 * Math.exp(l)).toFixed(1)}%`)
      .join("\n");
    span.setAttribute("aria-label", `${JSON.stringify(text)}, probability ${(100 * Math.exp(logprob)).toFixed(1)}%`);
  }
  into.appendChild(span);
}

async function send() {
  if (controller) return;
  if (!$("key-row").hidden && $("key").value) apiKey = $("key").value;
  let into = $("output"), answer = "";
  if (chatting()) {
    if (!$("prompt").value.trim()) return status("write your turn first", true);
    messages.push({ role: "user", content: $("prompt").value });
    turn("user", $("prompt").value);
    into = turn("assistant");
    $("prompt").value = "";
  } else {
    into.textContent = "";
    const prompt = document.createElement("span");
    prompt.className = "prompt-text";
    prompt.textContent = $("prompt").value;
    into.appendChild(prompt);
  }
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-button").disabled = false;
  status("generating…");
  const sent = performance.now();
  let first = null, tokens = 0, usage = null;
  try {
    const path = chatting() ? "/v1/chat/completions" : "/v1/completions";
    const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(request()),
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
          const [text, scored] = pieces(choice);
          render(text, scored, into);
          answer += text;
          tokens += scored.length;
          if (first === null && text) {
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
    if (chatting() && messages.length && messages[messages.length - 1].role === "user") {
      if (answer) messages.push({ role: "assistant", content: answer });
      else messages.pop(); // no answer came: the turn is not part of the conversation
    }
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
$("chat-mode").addEventListener("change", setMode);
$("new-chat").addEventListener("click", newChat);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
$("key").addEventListener("change", () => { apiKey = $("key").value || null; loadModel(); });
loadModel();
