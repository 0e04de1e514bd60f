// Validates Prometheus Operator resources (ServiceMonitor) against the operator's CRD schemas,
// which kubernetes-validate does not carry. Used by tests/operate.rs after `npm ci` here.
import yaml from "js-yaml";
import fs from "fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const kinds = { ServiceMonitor };
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    const Model = kinds[doc.kind];
    if (!Model) {
      console.error(`${file}: no schema for kind ${doc.kind}`);
      process.exit(1);
    }
    try {
      new Model(doc).validate();
    } catch (e) {
      console.error(`${file}: ${doc.kind}/${doc.metadata?.name}: ${e.message}`);
      process.exit(1);
    }
    console.log(`${file}: ${doc.kind}/${doc.metadata.name} valid`);
  }
}
