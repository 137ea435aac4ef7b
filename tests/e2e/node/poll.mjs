// posthog-node in local-evaluation mode: load the definitions, evaluate every user locally, let the poller
// run a few times, and print what happened as one JSON line. Driven by tests/e2e/test_node_sdk.py.
//
// Usage: node poll.mjs '{"host": "...", "token": "phc_...", "key": "phx_...", "users": [[id, props]], "polls": 3}'
import { PostHog } from 'posthog-node'

const config = JSON.parse(process.argv[2])
const requests = []

const client = new PostHog(config.token, {
  host: config.host,
  secretKey: config.key,
  featureFlagsPollingInterval: 300,
  // The SDK's own fetch, observed: every definitions request's status and the ETag it presented.
  fetch: async (url, options) => {
    const response = await fetch(url, options)
    if (url.includes('/flags/definitions')) {
      requests.push({
        status: response.status,
        etag: response.headers.get('etag'),
        ifNoneMatch: options.headers?.['If-None-Match'] ?? null,
      })
    }
    return response
  },
})

try {
  if (!(await client.waitForLocalEvaluationReady(5000))) {
    throw new Error('local evaluation did not become ready')
  }
  const evaluations = {}
  for (const [distinctId, personProperties] of config.users) {
    evaluations[distinctId] = await client.getAllFlagsAndPayloads(distinctId, {
      personProperties,
      onlyEvaluateLocally: true,
    })
  }
  const deadline = Date.now() + 10000
  while (requests.length < config.polls + 1 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  process.stdout.write(JSON.stringify({ evaluations, requests }) + '\n')
} finally {
  await client.shutdown()
}
