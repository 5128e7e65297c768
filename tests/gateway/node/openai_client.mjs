// The official OpenAI Node SDK against a Shoal server, streaming and not.
// Usage: node openai_client.mjs BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8000/v1)
// Exits non-zero with a FAIL line when the server's answers do not satisfy the SDK or the API.
import OpenAI from 'openai';

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: 'not-needed', timeout: 60_000, maxRetries: 0 });

function check(condition, message) {
  if (!condition) {
    console.error(`FAIL: ${message}`);
    process.exit(1);
  }
}

// A system prompt of several cache blocks, so that the second request with it is served
// partly from the prefix cache.
const system = ['You are terse.', ...Array.from({ length: 30 }, (_, i) => `Rule ${i + 1}: keep answers short.`)].join(' ');
const messages = [
  { role: 'system', content: system },
  { role: 'user', content: 'Say hello from Node.' },
];

const full = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
check(full.object === 'chat.completion', `object is ${full.object}`);
check(full.model === model, `model is ${full.model}`);
check(full.choices.length === 1, 'one choice');
const message = full.choices[0].message;
check(message.role === 'assistant', `role is ${message.role}`);
check(typeof message.content === 'string', 'content is a string');
check(['stop', 'length'].includes(full.choices[0].finish_reason), `finish_reason ${full.choices[0].finish_reason}`);
check(full.usage.completion_tokens >= 1 && full.usage.completion_tokens <= 8, `completion_tokens ${full.usage.completion_tokens}`);
check(full.usage.prompt_tokens > 5, `prompt_tokens ${full.usage.prompt_tokens}`);
check(full.usage.total_tokens === full.usage.prompt_tokens + full.usage.completion_tokens, 'total_tokens adds up');
check(full.usage.completion_tokens !== 8 || full.choices[0].finish_reason === 'length', 'eight tokens end by length');
// The server is fresh: nothing of the first prompt can come from the cache.
check(full.usage.prompt_tokens_details?.cached_tokens === 0, `first request cached_tokens ${full.usage.prompt_tokens_details?.cached_tokens}`);

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let text = '';
let chunks = 0;
let finish = null;
let usage = null;
let sawRole = false;
for await (const chunk of stream) {
  chunks += 1;
  check(chunk.object === 'chat.completion.chunk', `chunk object is ${chunk.object}`);
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    if (choice.delta?.role === 'assistant') sawRole = true;
    text += choice.delta?.content ?? '';
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
check(sawRole, 'the stream announces the assistant role');
check(chunks >= 3, `only ${chunks} chunks`);
check(finish === 'stop' || finish === 'length', `stream finish_reason ${finish}`);
check(usage !== null, 'the stream ends with usage when include_usage is set');
check(usage.completion_tokens >= 1 && usage.completion_tokens <= 8, `stream completion_tokens ${usage.completion_tokens}`);
check(usage.prompt_tokens === full.usage.prompt_tokens, 'same prompt, same prompt_tokens');
// The same prompt again: its leading blocks come from the prefix cache, its last token never does.
const cached = usage.prompt_tokens_details?.cached_tokens;
check(cached > 0 && cached < usage.prompt_tokens, `second request cached_tokens ${cached} of ${usage.prompt_tokens}`);

const completion = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 4, temperature: 0 });
check(completion.object === 'text_completion', `completion object ${completion.object}`);
check(typeof completion.choices[0].text === 'string', 'completion text');
check(completion.usage.completion_tokens >= 1 && completion.usage.completion_tokens <= 4, 'completion usage');
check(completion.usage.prompt_tokens_details?.cached_tokens === 0, 'a new short prompt has nothing cached');

try {
  await client.chat.completions.create({ model: 'no-such-model', messages });
  check(false, 'an unknown model was accepted');
} catch (e) {
  check(e instanceof OpenAI.NotFoundError, `unknown model raised ${e?.constructor?.name}`);
  check(e.status === 404, `status ${e.status}`);
}
try {
  await client.chat.completions.create({ model, messages, temperature: 7 });
  check(false, 'temperature 7 was accepted');
} catch (e) {
  check(e instanceof OpenAI.BadRequestError, `bad temperature raised ${e?.constructor?.name}`);
  check(e.param === 'temperature', `param ${e.param}`);
}

const models = await client.models.list();
check(models.data.some((m) => m.id === model), 'models.list names the model');

console.log(JSON.stringify({ ok: true, content: message.content, streamed: text, chunks, usage }));
