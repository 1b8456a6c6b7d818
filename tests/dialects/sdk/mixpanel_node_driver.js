// Drives the npm `mixpanel` package, unmodified, for tests/dialects/test_mixpanel_sdks.py.
//
// Reads {"config": {...}, "calls": [{"fn": "people.set", "args": [...]}, ...]}
// as JSON on stdin, makes each call in turn with a callback appended, and
// prints one JSON line: the error message of each call, or null. An argument
// {"$date": ms} becomes a Date, as an application would pass one.
"use strict";

const Mixpanel = require("mixpanel");

function revive(value) {
  if (Array.isArray(value)) return value.map(revive);
  if (value !== null && typeof value === "object") {
    if (Object.keys(value).length === 1 && typeof value.$date === "number") return new Date(value.$date);
    const out = {};
    for (const [key, item] of Object.entries(value)) out[key] = revive(item);
    return out;
  }
  return value;
}

function message(err) {
  if (!err) return null;
  // The batch calls hand back a list of errors.
  if (Array.isArray(err)) return err.map((e) => String(e && e.message ? e.message : e)).join("; ");
  return String(err.message ? err.message : err);
}

async function main() {
  let input = "";
  for await (const chunk of process.stdin) input += chunk;
  const { token, config, calls } = JSON.parse(input);
  const mixpanel = Mixpanel.init(token, config);
  const results = [];
  for (const call of calls) {
    const path = call.fn.split(".");
    const owner = path.length === 2 ? mixpanel[path[0]] : mixpanel;
    const fn = owner[path[path.length - 1]];
    results.push(
      await new Promise((resolve) => {
        fn.call(owner, ...revive(call.args), (err) => resolve(message(err)));
      }),
    );
  }
  process.stdout.write(JSON.stringify(results) + "\n");
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(2);
});
