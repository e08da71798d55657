// Preloaded (`node --import`) into the MCP Inspector CLI by
// `tests/mcp_real.rs`: adds `Authorization: Bearer $PORTCULLIS_MCP_TOKEN` to
// every `fetch` the CLI makes. The Inspector CLI 0.15 (the version `.ci/run`
// installs) has no option for request headers on its HTTP transport, and the
// gateway's `/mcp` refuses unauthenticated requests (401), so without this
// the real Inspector could not reach it at all. Nothing else is changed: the
// Inspector's own client and Streamable HTTP transport do all the MCP work.
const token = process.env.PORTCULLIS_MCP_TOKEN;
const realFetch = globalThis.fetch;
globalThis.fetch = (input, init = {}) => {
  const headers = new Headers(
    init.headers ?? (input instanceof Request ? input.headers : undefined),
  );
  if (token && !headers.has("authorization")) {
    headers.set("authorization", `Bearer ${token}`);
  }
  return realFetch(input, { ...init, headers });
};
