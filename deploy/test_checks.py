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
        perms["write"] = perms["write"].replace("presence|", "presence|work|", 1)
        self.assertFails("matches 'herald.work', which the gateway role does not need")

    def test_a_gateway_permission_on_the_default_exchange(self):
        perms = by(self.docs, "Permission", "herald-gateway")["spec"]["permissions"]
        perms["write"] = "^(" + perms["write"][1:-1] + "|amq\\.default)$"
        self.assertFails("matches 'amq.default', which the gateway role does not need")

    def test_an_api_that_may_declare(self):
        perms = by(self.docs, "Permission", "herald-api")["spec"]["permissions"]
        perms["configure"] = "^herald\\.(work|dead)$"
        self.assertFails("matches 'herald.work', which the api role does not need")

    def test_a_permission_missing_what_the_role_uses(self):
        perms = by(self.docs, "Permission", "herald-dispatcher")["spec"]["permissions"]
        perms["write"] = perms["write"].replace("|amq\\.default", "")
        self.assertFails("does not match 'amq.default', which the dispatcher role uses")

    # --- topic permissions on herald.events (who may publish which event) ---

    def test_no_gateway_topic_permission(self):
        self.docs.remove(by(self.docs, "TopicPermission", "herald-gateway-events"))
        self.assertFails("User herald-gateway: 0 TopicPermission objects on herald.events")

    def test_a_gateway_topic_permission_of_everything(self):
        by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["permissions"]["write"] = ".*"
        self.assertFails("TopicPermission herald-gateway-events write '.*': grants everything")

    def test_a_gateway_that_may_forge_delivery_outcomes(self):
        perms = by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["permissions"]
        perms["write"] = "^[a-z0-9-]{1,32}\\.(session_replaced|replayed|token_dead|delivered)(\\.[a-z]+)?$"
        self.assertFails(
            "matches 'default.token_dead.apns', which the gateway role does not need",
            "matches 'default.delivered.live', which the gateway role does not need",
        )

    def test_a_gateway_topic_permission_missing_its_own_event(self):
        perms = by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["permissions"]
        perms["write"] = "^[a-z0-9-]{1,32}\\.replayed\\.live$"
        self.assertFails("does not match 'default.session_replaced', which the gateway role uses")

    def test_a_gateway_topic_permission_on_another_exchange(self):
        by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["permissions"]["exchange"] = "amq.topic"
        self.assertFails("on exchange 'amq.topic'", "User herald-gateway: 0 TopicPermission objects on herald.events")

    def test_a_gateway_topic_permission_in_another_vhost(self):
        by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["vhost"] = "/"
        self.assertFails("TopicPermission herald-gateway-events: vhost '/' is not the vhost")

    def test_a_gateway_that_may_bind_events(self):
        by(self.docs, "TopicPermission", "herald-gateway-events")["spec"]["permissions"]["read"] = ".*"
        self.assertFails("TopicPermission herald-gateway-events read '.*'")

    def test_no_dispatcher_topic_permission(self):
        self.docs.remove(by(self.docs, "TopicPermission", "herald-dispatcher-events"))
        self.assertFails("User herald-dispatcher: 0 TopicPermission objects on herald.events")

    def test_a_dispatcher_that_may_forge_gateway_events(self):
        perms = by(self.docs, "TopicPermission", "herald-dispatcher-events")["spec"]["permissions"]
        perms["write"] = perms["write"].replace("|replaced)", "|replaced|session_replaced)")
        self.assertFails("matches 'default.session_replaced', which the dispatcher role does not need")

    def test_an_event_kind_no_role_owns(self):
        real = checks.event_kinds
        checks.event_kinds = lambda: real() | {"forged"}
        self.addCleanup(setattr, checks, "event_kinds", real)
        self.assertFails("event kind 'forged' (src/events.rs) belongs to no role")

    def test_url_inline_in_the_config(self):
        cm = next(d for d in self.docs if d.get("kind") == "ConfigMap")
        cm["data"]["herald.toml"] = cm["data"]["herald.toml"].replace(
            "[queue]\n", '[queue]\nurl = "amqps://u:p@h:5671/herald"\n'
        )
        self.assertFails("sets queue.url inline")

    # --- the offline inbox's PostgreSQL (postgres.yaml, networkpolicy-postgres.yaml) ---

    def with_example(self, text):
        """Point the overlay at a copy of secrets.example whose inbox URL is `text`."""
        import shutil
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        shutil.copytree(self.overlay / "secrets.example", Path(tmp.name) / "secrets.example")
        (Path(tmp.name) / "secrets.example/inbox-url.example").write_text(text)
        self.overlay = Path(tmp.name)

    def inbox_url(self):
        return (self.overlay / "secrets.example/inbox-url.example").read_text().strip()

    def test_missing_postgres_network_policy(self):
        self.docs.remove(by(self.docs, "NetworkPolicy", "herald-postgres"))
        self.assertFails("PostgreSQL pods (NetworkPolicy missing)")

    def test_postgres_from_any_pod(self):
        by(self.docs, "NetworkPolicy", "herald-postgres")["spec"]["ingress"][0].pop("from")
        self.assertFails("admits every source")

    def test_postgres_from_the_api_role(self):
        peer = by(self.docs, "NetworkPolicy", "herald-postgres")["spec"]["ingress"][0]["from"][0]
        peer["podSelector"].pop("matchExpressions")
        self.assertFails("admits herald pods other than the dispatcher and gateway")

    def test_postgres_from_another_namespace(self):
        rule = by(self.docs, "NetworkPolicy", "herald-postgres")["spec"]["ingress"][0]
        rule["from"].append({"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}})
        self.assertFails("is not herald's dispatcher/gateway pods")

    def test_no_egress_to_postgres(self):
        self.docs.remove(by(self.docs, "NetworkPolicy", "herald-inbox"))
        self.assertFails("Deployment/herald/herald-dispatcher: no NetworkPolicy egress rule lets it reach PostgreSQL")

    def test_cleartext_postgres(self):
        by(self.docs, "Cluster", "herald-postgres")["spec"]["postgresql"].pop("pg_hba")
        self.assertFails("cleartext connections stay possible")

    def test_network_superuser(self):
        by(self.docs, "Cluster", "herald-postgres")["spec"]["enableSuperuserAccess"] = True
        self.assertFails("enableSuperuserAccess is true")

    def test_inbox_url_inline_in_the_config(self):
        cm = next(d for d in self.docs if d.get("kind") == "ConfigMap")
        cm["data"]["herald.toml"] = cm["data"]["herald.toml"].replace(
            "[inbox]\n", '[inbox]\nurl = "postgres://herald:p@h:5432/herald"\n'
        )
        self.assertFails("sets inbox.url inline")

    def test_inbox_url_in_the_environment(self):
        env = container(by(self.docs, "Deployment", "herald-gateway"))["env"]
        env.append({"name": "HERALD__INBOX__URL", "value": "postgres://herald:p@h:5432/herald"})
        self.assertFails("sets HERALD__INBOX__URL")

    def test_inbox_url_file_not_a_mounted_secret(self):
        c = container(by(self.docs, "Deployment", "herald-dispatcher"))
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "inbox"]
        self.assertFails("herald-dispatcher: no Secret mounted at inbox.url_file")

    def test_an_inbox_role_without_the_inbox(self):
        c = container(by(self.docs, "Deployment", "herald-gateway"))
        c["env"] = [e for e in c["env"] if e["name"] != "HERALD__INBOX__URL_FILE"]
        self.assertFails("herald-gateway: runs ['gateway'] without inbox.url_file")

    def test_the_api_role_holds_the_inbox_secret(self):
        d = by(self.docs, "Deployment", "herald-api")
        d["spec"]["template"]["spec"]["volumes"].append({"name": "inbox", "secret": {"secretName": "herald-inbox"}})
        self.assertFails("herald-api: mounts the inbox Secret herald-inbox")

    def test_inbox_ca_not_mounted(self):
        c = container(by(self.docs, "Deployment", "herald-gateway"))
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "inbox-ca"]
        self.assertFails("herald-gateway: nothing mounted at the inbox URL's sslrootcert")

    def test_inbox_url_without_tls(self):
        url = self.inbox_url()
        self.with_example(url.replace("sslmode=verify-full", "sslmode=prefer"))
        self.assertFails("inbox-url.example: sslmode is 'prefer'")
        self.with_example(url.split("?")[0])
        self.assertFails("inbox-url.example: sslmode is None")

    def test_inbox_url_with_require_passes_only_with_a_ca(self):
        url = self.inbox_url()
        self.with_example(url.replace("sslmode=verify-full", "sslmode=require"))
        self.assertEqual(self.problems(), "")
        self.with_example(url.split("?")[0] + "?sslmode=require")
        self.assertFails("sslmode=require without sslrootcert verifies no certificate")

    def test_inbox_url_not_postgres(self):
        self.with_example(self.inbox_url().replace("postgres://", "mysql://"))
        self.assertFails("the inbox URL is not postgres://")


if __name__ == "__main__":
    RENDERED = checks.load_docs(sys.argv.pop(1))
    unittest.main(verbosity=1)
