// posthog-node capturing events: a batch sent as the SDK sends it (gzip-compressed by default), then a
// clean shutdown. Driven by tests/e2e/test_node_sdk.py.
//
// Usage: node capture.mjs '{"host": "...", "token": "phc_...", "events": ["name", ...], "distinctId": "..."}'
import { PostHog } from 'posthog-node'

const config = JSON.parse(process.argv[2])
const client = new PostHog(config.token, { host: config.host, flushAt: config.events.length, flushInterval: 0 })
for (const event of config.events) {
  client.capture({ distinctId: config.distinctId, event })
}
await client.shutdown(10000)
