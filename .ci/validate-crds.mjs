// Validates rendered custom resources against their CRD schemas (kubernetes-validate ships only core kinds).
// Usage: node .ci/validate-crds.mjs FILE.json  (a JSON array of manifests); TOOLS_DIR defaults to .tools.
// Prints one line per resource; exits 1 if any is invalid, 2 for a kind it has no schema for.
import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const modules = join(resolve(process.env.TOOLS_DIR ?? ".tools"), "npm", "node_modules", "@kubernetes-models");
const kinds = {
  "gateway.networking.k8s.io/v1 HTTPRoute": ["gateway-api", "gateway.networking.k8s.io/v1/HTTPRoute.js"],
  "monitoring.coreos.com/v1 ServiceMonitor": ["prometheus-operator", "monitoring.coreos.com/v1/ServiceMonitor.js"],
};

let status = 0;
for (const manifest of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const id = `${manifest.apiVersion} ${manifest.kind}`;
  const where = kinds[id];
  if (!where) {
    console.log(`UNKNOWN ${id}`);
    status = Math.max(status, 2);
    continue;
  }
  const module = await import(pathToFileURL(join(modules, ...where)).href);
  try {
    new module[manifest.kind](manifest).validate();
    console.log(`OK ${id} ${manifest.metadata.name}`);
  } catch (error) {
    console.log(`INVALID ${id} ${manifest.metadata.name}: ${error.message}`);
    status = Math.max(status, 1);
  }
}
process.exit(status);
