"""Unit tests of the pure model: labels in, sites and rejections out."""

from __future__ import annotations

import dataclasses

import pytest

from incus_caddyfile.labels import HTTP, KEY_ENABLE, KEY_HOST, KEY_PORT
from incus_caddyfile.model import (
    Instance,
    InvalidValue,
    Nic,
    Policy,
    build,
    explain,
    in_wildcard,
    parse_hostname,
    parse_hosts,
    parse_port,
    pick_address,
    pool_mates,
)

from .helpers import inst


def test_one_instance_becomes_one_site() -> None:
    model = build([inst("web")])
    assert [(s.host, s.dials) for s in model.sites] == [("web.example.org", ["198.18.0.10:80"])]
    assert model.rejections == () and model.skipped == ()


def test_instances_without_labels_are_ignored_silently() -> None:
    plain = Instance(project="default", name="db", config={"user.other": "x"})
    assert build([plain]) == build([])


def test_enable_is_case_insensitive_and_false_skips() -> None:
    model = build([inst("a", enable=" TRUE "), inst("b", host="b.example.org", enable="False")])
    assert [s.host for s in model.sites] == ["web.example.org"]
    assert [(s.instance, s.reason) for s in model.skipped] == [("b", f"{KEY_ENABLE} is false")]


def test_keys_without_enable_are_skipped_not_rejected() -> None:
    model = build([inst("a", enable=None)])
    assert model.sites == () and model.rejections == ()
    assert "is not set" in model.skipped[0].reason


@pytest.mark.parametrize("value", ["yes", "1", "on", "", "true false"])
def test_enable_other_values_are_rejected(value: str) -> None:
    model = build([inst("a", enable=value)])
    assert model.sites == ()
    [rejection] = model.rejections
    assert (rejection.key, rejection.value) == (KEY_ENABLE, value)
    assert rejection.reason == "must be true or false"


def test_several_hosts_separated_by_spaces_or_commas() -> None:
    model = build([inst("a", host="A.example.org, b.example.org  c.example.org,")])
    assert [s.host for s in model.sites] == ["a.example.org", "b.example.org", "c.example.org"]


def test_same_host_in_one_project_is_load_balanced_in_stable_order() -> None:
    model = build([inst("web2", address="198.18.0.2"), inst("web1", address="198.18.0.9")])
    [site] = model.sites
    assert site.instances == ["default/web1", "default/web2"]
    assert site.dials == ["198.18.0.9:80", "198.18.0.2:80"]


def test_same_host_in_two_projects_goes_to_the_earliest_claimant() -> None:
    first = inst("old", project="zeta", created_at="2025-01-01T00:00:00Z")
    second = inst("new", project="alpha", created_at="2026-01-01T00:00:00Z")
    model = build([second, first])
    [site] = model.sites
    assert site.instances == ["zeta/old"]
    [rejection] = model.rejections
    assert (rejection.project, rejection.instance, rejection.value) == (
        "alpha",
        "new",
        "web.example.org",
    )
    assert "zeta/old" in rejection.reason


def test_stopped_and_addressless_instances_are_skipped_with_reason() -> None:
    stopped = inst("a", status="Stopped")
    no_ip = Instance("default", "b", config=inst("b").config, nics=(Nic("eth0", ("fe80::1",)),))
    model = build([stopped, no_ip])
    assert model.sites == ()
    assert [s.reason for s in model.skipped] == [
        "not running (Stopped)",
        "running but has no IPv4 address yet",
    ]


def test_invalid_labels_are_reported_even_when_stopped() -> None:
    model = build([inst("a", status="Stopped", port="http")])
    assert [r.key for r in model.rejections] == [KEY_PORT]


def test_missing_keys_are_rejected_naming_the_key() -> None:
    model = build([inst("a", host=None, port=None)])
    assert [(r.key, r.value) for r in model.rejections] == [(KEY_HOST, None), (KEY_PORT, None)]
    assert "(not set)" in str(model.rejections[0])


def test_unknown_key_is_reported_but_instance_still_routed() -> None:
    model = build([inst("a", **{HTTP + "upstream.prot": "80"})])
    assert [s.host for s in model.sites] == ["web.example.org"]
    assert "unknown key" in model.rejections[0].reason


def test_rejection_message_names_project_instance_key_value_reason() -> None:
    model = build([inst("web", project="shop", port="99999")])
    assert str(model.rejections[0]) == (
        f"rejected shop/web: {KEY_PORT}='99999': not a port number from 1 to 65535"
    )


def test_one_bad_instance_does_not_hide_the_others() -> None:
    model = build([inst("bad", host="x{", port="80"), inst("good", host="ok.example.org")])
    assert [s.host for s in model.sites] == ["ok.example.org"]
    assert [r.instance for r in model.rejections] == ["bad"]


def test_output_order_does_not_depend_on_listing_order() -> None:
    fleet = [inst(f"w{i}", host=f"h{i % 3}.example.org", address=f"198.18.0.{i}") for i in range(9)]
    assert build(fleet) == build(list(reversed(fleet)))


@pytest.mark.parametrize(
    "raw",
    [
        "a.example.org\n}",
        "a.example.org{",
        "import",  # a Caddyfile directive where a site address stands
        "",
    ],
)
def test_parse_hosts_structure_characters(raw: str) -> None:
    with pytest.raises(InvalidValue):
        parse_hosts(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("ex ample", None),  # two hosts: valid
        ("*.example.org", None),
        ("a.*.example.org", "only allowed as the whole first label"),
        ("*", "needs a domain"),
        ("*example.org", "only allowed as the whole first label"),
        ("exämple.org", "not an ASCII hostname"),
        ("-a.example.org", "not a hostname"),
        ("a..example.org", "not a hostname"),
        ("a.example.org.", "not a hostname"),
        ("a_b.example.org", "not a hostname"),
        ("{$HOME}.example.org", "not a hostname"),
        ("{env.SECRET}", "not a hostname"),
        ("a" * 64 + ".org", "not a hostname"),
        (("a" * 60 + ".") * 5 + "org", "longer than 253"),
        ("#comment", "not a hostname"),
        ('"quoted"', "not a hostname"),
        ("`tick`", "not a hostname"),
    ],
)
def test_hostname_allowlist(raw: str, reason: str | None) -> None:
    if reason is None:
        assert parse_hosts(raw)
    else:
        with pytest.raises(InvalidValue, match=reason):
            parse_hosts(raw)


def test_hostnames_are_lowercased() -> None:
    assert parse_hostname("WeB.Example.ORG") == "web.example.org"


@pytest.mark.parametrize("raw", ["0", "65536", "-1", "80.0", "0x50", "8 0", "", "80\n"])
def test_port_rejects(raw: str) -> None:
    if raw == "80\n":  # surrounding whitespace is trimmed, not structure
        assert parse_port(raw) == 80
        return
    with pytest.raises(InvalidValue):
        parse_port(raw)


@pytest.mark.parametrize("raw", ["1", "80", " 8080 ", "65535"])
def test_port_accepts(raw: str) -> None:
    assert parse_port(raw) == int(raw)


def test_address_is_first_usable_ipv4_in_nic_name_order() -> None:
    instance = Instance(
        "default",
        "a",
        nics=(
            Nic("eth1", ("198.18.1.5",)),
            Nic("eth0", ("fe80::1", "2001:db8::5", "127.0.0.1", "169.254.1.1", "198.18.0.5")),
        ),
    )
    assert pick_address(instance) == "198.18.0.5"


def test_wildcard_mode_groups_hosts_under_the_wildcard() -> None:
    model = build(
        [
            inst("a", host="a.example.org", address="198.18.0.1"),
            inst("b", host="b.example.org", address="198.18.0.2"),
            inst("deep", host="x.y.example.org", address="198.18.0.3"),
            inst("other", host="other.net", address="198.18.0.4"),
            inst("apex", host="example.org", address="198.18.0.5"),
        ],
        wildcards=["*.example.org"],
    )
    [w] = model.wildcard_sites
    assert [s.host for s in w.sites] == ["a.example.org", "b.example.org"]
    assert w.catch_all is None
    assert [s.host for s in model.sites] == ["example.org", "other.net", "x.y.example.org"]


def test_wildcard_host_label_becomes_the_fallback() -> None:
    model = build([inst("catch", host="*.example.org")], wildcards=["*.example.org"])
    assert model.wildcard_sites[0].catch_all is not None
    assert model.sites == ()


def test_in_wildcard() -> None:
    assert in_wildcard("a.example.org", "*.example.org")
    assert not in_wildcard("example.org", "*.example.org")
    assert not in_wildcard("a.b.example.org", "*.example.org")
    assert not in_wildcard("aexample.org", "*.example.org")


def test_matcher_names_are_unique_per_host() -> None:
    model = build(
        [inst("a", host="a-b.example.org"), inst("b", host="a.b.example.org", project="p")]
    )
    assert len({s.matcher for s in model.sites}) == 2


def test_wildcard_matcher_cannot_collide_with_a_host() -> None:
    model = build([inst("a", host="*.example.org"), inst("b", host="wildcard.example.org")])
    assert len({s.matcher for s in model.sites}) == 2


def test_stopped_holder_keeps_its_host_from_other_projects() -> None:
    holder = inst("old", project="a", status="Stopped", created_at="2025-01-01T00:00:00Z")
    hijack = inst("new", project="b", created_at="2026-01-01T00:00:00Z")
    model = build([holder, hijack])
    assert model.sites == ()  # not handed over while the holder is down
    [rejection] = model.rejections
    assert (rejection.project, rejection.instance) == ("b", "new")
    assert "a/old" in rejection.reason


def test_creation_order_compares_fractions_of_a_second() -> None:
    earlier = inst("x", project="b", created_at="2026-01-01T00:00:01Z", address="198.18.0.1")
    later = inst("y", project="a", created_at="2026-01-01T00:00:01.5Z", address="198.18.0.2")
    assert build([later, earlier]).sites[0].instances == ["b/x"]
    a = inst("x", project="b", created_at="2026-01-01T00:00:01.39582204Z")
    b = inst("y", project="a", created_at="2026-01-01T00:00:01.4Z")
    assert build([b, a]).sites[0].instances == ["b/x"]


def test_unknown_key_is_ignored_not_rejected() -> None:
    model = build([inst("a", **{HTTP + "upstream.prot": "80"})])
    [notice] = model.rejections
    assert notice.ignored
    assert str(notice).startswith("ignored default/a: user.caddyserver.http.upstream.prot='80'")


def test_wildcard_and_host_under_it_in_other_projects_earliest_wins() -> None:
    wild = inst(
        "wild",
        project="a",
        host="*.example.org",
        created_at="2025-01-01T00:00:00Z",
        address="198.18.0.1",
    )
    exact = inst(
        "shop",
        project="b",
        host="shop.example.org",
        created_at="2026-01-01T00:00:00Z",
        address="198.18.0.2",
    )
    deeper = inst(
        "deep",
        project="b",
        host="x.shop.example.org",
        created_at="2026-01-01T00:00:00Z",
        address="198.18.0.3",
    )
    model = build([exact, wild, deeper])
    assert [s.host for s in model.sites] == ["*.example.org", "x.shop.example.org"]
    [rejection] = model.rejections
    assert rejection.instance == "shop"
    assert rejection.reason.startswith("overlapping *.example.org already claimed by a/wild")
    # the other way round: the exact host came first, the later wildcard is refused
    exact_first = inst(
        "shop", project="b", host="shop.example.org", created_at="2024-01-01T00:00:00Z"
    )
    model = build([exact_first, wild])
    assert [s.host for s in model.sites] == ["shop.example.org"]
    assert model.rejections[0].instance == "wild"


def test_one_project_may_hold_a_wildcard_and_hosts_under_it() -> None:
    model = build([inst("wild", host="*.example.org"), inst("shop", host="shop.example.org")])
    assert [s.host for s in model.sites] == ["*.example.org", "shop.example.org"]
    assert model.rejections == ()


POLICY = Policy(
    domains=(
        ("tenant-a", ("*.a.example.org", "a.example.com")),
        ("tenant-b", ("*.b.example.org",)),
    )
)


@pytest.mark.parametrize(
    ("project", "host", "allowed"),
    [
        ("tenant-a", "shop.a.example.org", True),
        ("tenant-a", "x.y.a.example.org", True),
        ("tenant-a", "*.a.example.org", True),
        ("tenant-a", "*.x.a.example.org", True),
        ("tenant-a", "a.example.com", True),
        ("tenant-a", "a.example.org", False),  # the apex is not below itself
        ("tenant-a", "www.a.example.com", False),
        ("tenant-a", "shop.b.example.org", False),
        ("tenant-a", "*.example.org", False),
        ("tenant-b", "a.example.com", False),
        ("other", "anything.example.net", True),  # unlisted: anything not reserved
        ("other", "shop.a.example.org", False),  # reserved for tenant-a
        ("other", "a.example.com", False),
        ("other", "*.b.example.org", False),
        ("other", "*.example.com", False),  # would serve a.example.com
        ("other", "*.example.org", True),  # one label: serves a.example.org, not below it
    ],
)
def test_domain_policy(project: str, host: str, allowed: bool) -> None:
    assert (POLICY.refuses(project, host) is None) == allowed


def test_policy_rejections_name_the_rule_and_keep_allowed_hosts() -> None:
    model = build(
        [inst("web", project="tenant-a", host="shop.a.example.org evil.b.example.org")],
        policy=POLICY,
    )
    assert [s.host for s in model.sites] == ["shop.a.example.org"]
    [rejection] = model.rejections
    assert rejection.value == "evil.b.example.org"
    assert "may only claim hosts under: *.a.example.org, a.example.com" in rejection.reason


def test_a_refused_claim_does_not_block_an_allowed_one() -> None:
    squatter = inst(
        "sq",
        project="tenant-b",
        host="shop.a.example.org",
        created_at="2020-01-01T00:00:00Z",
        address="198.18.0.1",
    )
    owner = inst("web", project="tenant-a", host="shop.a.example.org", address="198.18.0.2")
    model = build([squatter, owner], policy=POLICY)
    assert model.sites[0].instances == ["tenant-a/web"]


def test_default_list_for_unnamed_projects_still_respects_reservations() -> None:
    policy = Policy(domains=(("*", ("*.example.org",)), ("tenant-a", ("*.a.example.org",))))
    assert policy.refuses("x", "shop.example.org") is None
    assert policy.refuses("x", "shop.example.net") is not None
    assert "reserved for project tenant-a" in (policy.refuses("x", "s.a.example.org") or "")


def test_include_and_exclude_projects() -> None:
    policy = Policy(include=("tenant-*", "default"), exclude=("tenant-old",))
    fleet = [
        inst("a", project="tenant-1", host="a.example.org"),
        inst("b", project="tenant-old", host="b.example.org"),
        inst("c", project="staging", host="c.example.org"),
        inst("d", project="default", host="d.example.org"),
    ]
    model = build(fleet, policy=policy)
    assert [s.host for s in model.sites] == ["a.example.org", "d.example.org"]
    assert {s.project for s in model.skipped} == {"tenant-old", "staging"}


def test_explain_gives_each_labelled_instance_its_verdict() -> None:
    fleet = [
        inst("web", host="web.example.org", address="198.18.0.1"),
        inst("down", host="down.example.org", status="Stopped"),
        inst("bad", host="bad.example.org", port="http"),
        inst(
            "late",
            project="other",
            host="web.example.org shop.example.org",
            created_at="2027-01-01T00:00:00Z",
            address="198.18.0.4",
        ),
        Instance("default", "plain", config={"user.other": "x"}),
    ]
    rows = {r.instance: r for r in explain(fleet, build(fleet))}
    assert set(rows) == {"web", "down", "bad", "late"}
    assert (rows["web"].state, rows["web"].upstream, rows["web"].routed) == (
        "routed",
        "198.18.0.1:80",
        ("web.example.org",),
    )
    assert rows["down"].state == "not routed"
    assert rows["down"].reasons == ("not running (Stopped)",)
    assert rows["bad"].reasons[0].startswith(f"rejected {KEY_PORT}='http'")
    assert rows["late"].state == "partly routed"
    assert rows["late"].routed == ("shop.example.org",)
    assert "already claimed by default/web" in rows["late"].reasons[0]


def test_a_paused_instance_keeps_its_route() -> None:
    """Incus freezes containers while it snapshots them: no outage, no reloads for that."""
    assert [s.host for s in build([inst("web", status="Frozen")]).sites] == ["web.example.org"]


# ---- a holder keeps its hosts, whatever happens to its labels (issue: typo hands a host over)

HOLDER_AT = "2025-01-01T00:00:00Z"


def _holder(**change: str) -> Instance:
    params: dict[str, str] = {"project": "tenant-a", "host": "shop.example.org"}
    return inst("web", created_at=HOLDER_AT, **{**params, **change})


RIVAL = inst("x", project="tenant-b", host="shop.example.org", address="198.18.0.99")


@pytest.mark.parametrize(
    "change",
    [
        {"port": "80/tcp"},
        {"port": "0"},
        {HTTP + "import": "auth"},  # a snippet this run does not know (--snippets missing)
        {HTTP + "upstream.scheme": "gopher"},
        {HTTP + "upstream.scheme": "https"},  # with port 80: a pair Caddy refuses
        {HTTP + "matchers.path": "/api/*"},
        {"enable": "yes"},
        {"host": "shop.example.org bad_host!"},  # the valid host is still held
    ],
    ids=str,
)
def test_a_holder_whose_labels_became_invalid_keeps_its_hosts(change: dict[str, str]) -> None:
    holder = _holder(**change)
    model = build([holder, RIVAL])
    assert model.sites == ()  # neither routes it: the holder is invalid, the rival refused
    reasons = [r.reason for r in model.rejections if r.instance == "x"]
    assert reasons == ["host already claimed by tenant-a/web (created earlier, in another project)"]
    assert any(r.instance == "web" and not r.ignored for r in model.rejections)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"enable": "false"}, "disabled"),
        ({"host": None}, "host label dropped"),
        ({"host": "other.example.org"}, "host label changed"),
    ],
)
def test_a_holder_releases_its_hosts_only_on_purpose(
    change: dict[str, str | None], why: str
) -> None:
    holder = inst("web", project="tenant-a", host="shop.example.org", created_at=HOLDER_AT)
    labels = dict(holder.config)
    for key, value in change.items():
        full = {"enable": KEY_ENABLE, "host": KEY_HOST}[key]
        if value is None:
            labels.pop(full)
        else:
            labels[full] = value
    model = build([dataclasses.replace(holder, config=labels), RIVAL])
    shop = {s.host: s for s in model.sites}["shop.example.org"]
    assert shop.instances == ["tenant-b/x"], why


def test_a_holder_refused_by_caddy_keeps_its_hosts() -> None:
    model = build([_holder(), RIVAL], refused={("tenant-a", "web"): "bad route"})
    assert model.sites == ()
    verdict = next(r for r in model.rejections if r.instance == "web")
    assert verdict.key == "" and verdict.reason == "Caddy refused its route: bad route"


# ---- every status an instance can be in


@pytest.mark.parametrize("status", ["Running", "Frozen", "Ready"])
def test_up_statuses_route(status: str) -> None:
    assert build([inst("web", status=status)]).sites[0].instances == ["default/web"]


def test_error_is_unknown_not_stopped_and_keeps_its_hosts() -> None:
    """Without a last known address (with one: tests/test_member_down.py)."""
    lost = dataclasses.replace(inst("web", status="Error", created_at=HOLDER_AT), nics=())
    model = build([lost, inst("x", project="b")])
    assert model.sites == ()
    [skip] = model.skipped
    assert skip.unknown and skip.reason.startswith("unknown:")
    [row] = explain([lost], build([lost]))
    assert row.state == "unknown"


@pytest.mark.parametrize("status", ["Stopped", "Stopping", "Starting", "Aborting"])
def test_other_statuses_do_not_route_but_hold(status: str) -> None:
    model = build([inst("web", status=status, created_at=HOLDER_AT), inst("x", project="b")])
    assert model.sites == () and not model.skipped[0].unknown


# ---- combinations of values that are valid alone


@pytest.mark.parametrize(
    ("labels", "key", "words"),
    [
        ({"upstream.scheme": "https"}, "upstream.scheme", "port=80 (the HTTP port)"),
        ({"upstream.scheme": "h2c", "port": "443"}, "upstream.scheme", "(the HTTPS port)"),
        ({"port": "443"}, "upstream.port", "set upstream.scheme=https"),
        ({"upstream.scheme": "http", "port": "443"}, "upstream.scheme", "(the HTTPS port)"),
        ({"upstream.tls_insecure": "true"}, "upstream.tls_insecure", "only for"),
        (
            {"upstream.tls_insecure": "true", "upstream.scheme": "h2c", "port": "8080"},
            "upstream.tls_insecure",
            "plain-HTTP port",
        ),
    ],
)
def test_pairs_caddy_refuses_are_rejected_naming_the_keys(
    labels: dict[str, str], key: str, words: str
) -> None:
    port = labels.pop("port", "80")
    model = build([inst("web", port=port, **{HTTP + k: v for k, v in labels.items()})])
    assert model.sites == ()
    [rejection] = [r for r in model.rejections if not r.ignored]
    assert rejection.key == HTTP + key and words in rejection.reason


@pytest.mark.parametrize(
    ("scheme", "port"), [("https", "443"), ("https", "8443"), ("h2c", "80"), ("http", "8080")]
)
def test_pairs_caddy_accepts_route(scheme: str, port: str) -> None:
    labels = {HTTP + "upstream.scheme": scheme}
    if scheme == "https":
        labels[HTTP + "upstream.tls_insecure"] = "true"
    assert build([inst("web", port=port, **labels)]).sites


def test_an_unknown_key_with_a_trailing_space_is_shown_quoted() -> None:
    [notice] = build([inst("web", **{HTTP + "upstream.port ": "80"})]).rejections
    assert "'user.caddyserver.http.upstream.port '=" in str(notice)


def test_a_pool_member_that_sets_no_option_is_not_warned_about() -> None:
    first = inst("a", created_at=HOLDER_AT, **{HTTP + "upstream.lb_policy": "first"})
    plain = inst("b", address="198.18.0.11")
    model = build([first, plain])
    assert model.rejections == () and len(model.sites[0].upstreams) == 2


# ---- draining: watch takes members out of their pools


def test_a_draining_member_leaves_its_pool_while_another_can_serve() -> None:
    fleet = [
        inst("a", host="pool.example.org", address="198.18.0.1"),
        inst("b", host="pool.example.org", address="198.18.0.2"),
        inst("solo", host="solo.example.org", address="198.18.0.3"),
    ]
    sites = {s.host: s.dials for s in build(fleet, draining={("default", "a")}).sites}
    assert sites["pool.example.org"] == ["198.18.0.2:80"]
    both = {("default", "a"), ("default", "b"), ("default", "solo")}
    sites = {s.host: s.dials for s in build(fleet, draining=both).sites}
    assert sites["pool.example.org"] == ["198.18.0.1:80", "198.18.0.2:80"]  # nowhere else
    assert sites["solo.example.org"] == ["198.18.0.3:80"]  # a single instance keeps routing


def test_pool_mates_are_up_members_of_the_same_project_host_and_path() -> None:
    a = inst("a", host="pool.example.org", address="198.18.0.1")
    mates = [
        inst("b", host="x.example.org pool.example.org", address="198.18.0.2"),
        inst("c", host="pool.example.org", status="Stopped"),
        inst("d", host="pool.example.org", project="other"),
        inst("e", host="pool.example.org", **{HTTP + "matchers.path": "/api"}),
    ]
    assert pool_mates([a, *mates], a)
    assert not pool_mates([a, *mates[1:]], a)
    assert not pool_mates([a, inst("f", host="pool.example.org", enable="false")], a)
