#!/usr/bin/env python3
"""Self-test of `checks.py security`: the rendered production overlay passes, and each
lock-down it guards, undone, fails it with a message naming the problem.

  test_checks.py RENDERED_PRODUCTION_YAML

Run by deploy/check.sh after it renders the overlays (so a check that can no longer fail
is caught, not just a manifest that no longer passes).
"""

import copy
import sys
import unittest
from pathlib import Path

import checks

RENDERED = None


def by(docs, kind, name=None):
    for d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    raise KeyError(f"{kind}/{name}")


def container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


class Security(unittest.TestCase):
    def setUp(self):
        self.docs = copy.deepcopy(RENDERED)
        self.overlay = checks.DEPLOY / "k8s/overlays/production"

    def problems(self):
        return "\n".join(checks.security_problems(self.docs, self.overlay))

    def assertFails(self, *fragments):
        out = self.problems()
        self.assertTrue(out, "the mutation passed the security check")
        for f in fragments:
            self.assertIn(f, out)

    def test_the_shipped_overlay_passes(self):
        self.assertEqual(self.problems(), "")

    def test_missing_herald_network_policy(self):
        self.docs.remove(by(self.docs, "NetworkPolicy", "herald"))
        self.assertFails("NetworkPolicy missing", "Deployment/herald/herald-gateway")

    def test_missing_broker_network_policy(self):
        self.docs.remove(by(self.docs, "NetworkPolicy", "herald-rabbitmq"))
        self.assertFails("RabbitMQ pods (NetworkPolicy missing)")

    def test_8080_from_any_pod(self):
        by(self.docs, "NetworkPolicy", "herald")["spec"]["ingress"][0].pop("from")
        self.assertFails("admits every source")

    def test_8080_from_a_whole_namespace(self):
        peer = by(self.docs, "NetworkPolicy", "herald")["spec"]["ingress"][0]["from"][0]
        peer.pop("podSelector")
        self.assertFails("must name both a namespace and pods")

    def test_amqp_from_another_namespace(self):
        rule = by(self.docs, "NetworkPolicy", "herald-rabbitmq")["spec"]["ingress"][0]
        rule["from"].append({"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}})
        self.assertFails("is not herald's pods in this namespace")

    def test_cleartext_amqp(self):
        rc = by(self.docs, "RabbitmqCluster")
        rc["spec"]["tls"]["disableNonTLSListeners"] = False
        self.assertFails("cleartext 5672 stays open")
        rc["spec"].pop("tls")
        self.assertFails("AMQP would be cleartext")

    def test_amqp_url_in_the_example_is_checked(self):
        # The example file is read from disk; a cleartext URL there must fail. Simulated by
        # pointing the overlay at a copy with amqp://.
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(self.overlay / "secrets.example", Path(tmp) / "secrets.example")
            f = Path(tmp) / "secrets.example/url-gateway.example"
            f.write_text(f.read_text().replace("amqps://", "amqp://").replace(":5671/", ":5672/"))
            self.overlay = Path(tmp)
            self.assertFails("url-gateway.example: the queue URL is not amqps://")

    def test_no_ca_file(self):
        cm = next(d for d in self.docs if d.get("kind") == "ConfigMap")
        cm["data"]["herald.toml"] = cm["data"]["herald.toml"].replace("ca_file =", "# ca_file =")
        self.assertFails("queue.ca_file unset")

    def test_a_role_uses_the_default_admin_user(self):
        d = by(self.docs, "Deployment", "herald-gateway")
        vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "broker")
        vol["secret"]["secretName"] = "herald-rabbitmq-default-user"
        self.assertFails("default (administrator) user")

    def test_two_roles_share_a_user(self):
        d = by(self.docs, "Deployment", "herald-gateway")
        vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "broker")
        vol["secret"]["secretName"] = "herald-broker-dispatcher"
        self.assertFails("shares its broker Secret")

    def test_an_admin_tagged_user(self):
        by(self.docs, "User", "herald-api")["spec"]["tags"] = ["administrator"]
        self.assertFails("User herald-api: has tags")

    def test_a_permission_of_everything(self):
        by(self.docs, "Permission", "herald-gateway")["spec"]["permissions"]["write"] = ".*"
        self.assertFails("grants everything")

    def test_an_unanchored_permission(self):
        perms = by(self.docs, "Permission", "herald-api")["spec"]["permissions"]
        perms["write"] = "herald\\.(work|dead)"
        self.assertFails("not anchored", "matches 'xherald.work'")

    def test_a_permission_that_reaches_another_role(self):
        perms = by(self.docs, "Permission", "herald-gateway")["spec"]["permissions"]
        perms["write"] = perms["write"].replace("sessions|", "sessions|events|")
        self.assertFails("matches 'herald.events', which the gateway role does not need")

    def test_a_permission_missing_what_the_role_uses(self):
        perms = by(self.docs, "Permission", "herald-dispatcher")["spec"]["permissions"]
        perms["write"] = perms["write"].replace("|amq\\.default", "")
        self.assertFails("does not match 'amq.default', which the dispatcher role uses")

    def test_url_inline_in_the_config(self):
        cm = next(d for d in self.docs if d.get("kind") == "ConfigMap")
        cm["data"]["herald.toml"] = cm["data"]["herald.toml"].replace(
            "[queue]\n", '[queue]\nurl = "amqps://u:p@h:5671/herald"\n'
        )
        self.assertFails("sets queue.url inline")


if __name__ == "__main__":
    RENDERED = checks.load_docs(sys.argv.pop(1))
    unittest.main(verbosity=1)
