// Preloaded into the conformance CLI (node --import): the CLI has no way to send a credential,
// and every request to Portcullis needs one. This adds the header named by
// CONFORMANCE_AUTH_HEADER (default x-api-key) with CONFORMANCE_AUTH_VALUE to every request made
// through undici's global dispatcher, which both Node's fetch and the CLI's own undici use.
// Some probes use node:http directly; its request() is wrapped the same way.
// Host and Origin are left alone, so the DNS-rebinding scenario still tests what it should.
import http from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(process.env.CONFORMANCE_UNDICI_FROM ?? import.meta.url);
const { Agent, setGlobalDispatcher } = require('undici');
const name = (process.env.CONFORMANCE_AUTH_HEADER ?? 'x-api-key').toLowerCase();
const value = process.env.CONFORMANCE_AUTH_VALUE;

function withCredential(headers) {
  if (headers == null) return { [name]: value };
  if (Array.isArray(headers)) {
    // Either [[k, v], …] or a flat [k, v, k, v, …] list.
    if (headers.length && Array.isArray(headers[0])) return [...headers, [name, value]];
    return [...headers, name, value];
  }
  if (typeof headers[Symbol.iterator] === 'function' && headers.constructor !== Object) {
    return [...headers, [name, value]];
  }
  return { ...headers, [name]: value };
}

if (value) {
  setGlobalDispatcher(
    new Agent().compose((dispatch) => (options, handler) => dispatch({ ...options, headers: withCredential(options.headers) }, handler)),
  );
}

if (value) {
  const request = http.request;
  http.request = function (options, ...rest) {
    if (options && typeof options === 'object' && !(options instanceof URL)) {
      options = { ...options, headers: withCredential(options.headers) };
    }
    return request.call(this, options, ...rest);
  };
}
