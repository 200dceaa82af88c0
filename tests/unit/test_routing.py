"""The router of `kiln serve models:/NAME` (pipeline/serving/routing.py): names clients send, the
canary split's proportions and stickiness, and the errors a bad `--route` or routes file gets."""

from collections import Counter

import pytest

from pipeline.serving.routing import NEWEST, RouteError, Router, Routes, Split, parse_route_option, read_routes_file

NAME = "m"


def router(split: str | None = None, seed: int = 0, aliases=None, newest=None) -> Router:
    r = Router(seed=seed)
    aliases = {"production": "1", "staging": "2"} if aliases is None else aliases
    versions = set(aliases.values()) | ({newest} if newest else set())
    r.publish(Routes(NAME, aliases, {v: f"target-{v}" for v in versions}, Split.parse(split) if split else None, newest))
    return r


def test_names_resolve_to_their_versions():
    r = router()
    assert r.choose(NAME).version == "1" and r.choose(NAME).alias == "production"
    assert r.choose(f"{NAME}@staging").target == "target-2"
    assert r.choose(f"{NAME}/2").version == "2" and r.choose(f"{NAME}/2").alias == ""
    for bad in (f"{NAME}@canary", f"{NAME}/3", "other", f"{NAME}@", f"{NAME}/x"):
        with pytest.raises(LookupError, match="served"):
            r.choose(bad)


def test_bare_name_without_production_is_the_newest_version_or_refused():
    assert router(aliases={"staging": "2"}, newest="3").choose(NAME).version == "3"
    assert router(aliases={"staging": "2"}, newest="3").choose(NAME).alias == NEWEST
    with pytest.raises(LookupError, match="no @production"):
        router(aliases={"staging": "2"}).choose(NAME)


def test_a_pinned_server_names_its_one_version_pinned():
    from pipeline.serving.gateway import Served, pinned_router

    r = pinned_router(Served("unused", "m", "m/4", None, {}))
    assert (r.choose(NAME).alias, r.choose(NAME).version) == ("pinned", "4") and r.choose(f"{NAME}/4").version == "4"
    assert [(e["id"], e["kiln_alias"]) for e in r.routes.listing()] == [(NAME, "pinned"), (f"{NAME}/4", None)]


def test_a_90_10_split_over_1000_users_is_within_3_points_and_sticky():
    r = router("production:90,staging:10", seed=11)
    shares = Counter(r.choose(NAME, f"user-{i}").alias for i in range(1000))
    assert abs(shares["staging"] / 1000 - 0.10) <= 0.03, shares
    assert len({r.choose(NAME, "alice").version for _ in range(50)}) == 1
    # the same seed sends a user to the same alias on another replica
    assert all(router("production:90,staging:10", seed=11).choose(NAME, f"user-{i}").alias == r.choose(NAME, f"user-{i}").alias
               for i in range(100))
    anonymous = Counter(r.choose(NAME).alias for _ in range(1000))  # drawn from the seeded generator
    assert abs(anonymous["staging"] / 1000 - 0.10) <= 0.03, anonymous
    assert r.choose(f"{NAME}@production", "alice").alias == "production"  # an alias asked by name is not split


def test_a_split_naming_an_alias_without_a_version_sends_its_share_to_the_others():
    r = router("production:50,canary:50")
    assert {r.choose(NAME, f"u{i}").alias for i in range(200)} == {"production"}


def test_listing_names_every_alias_and_version():
    ids = {e["id"]: (e["root"], e.get("kiln_split")) for e in router("production:90,staging:10").routes.listing()}
    assert ids == {NAME: ("m/1", "production:90,staging:10"), f"{NAME}@production": ("m/1", None), f"{NAME}@staging": ("m/2", None),
                   f"{NAME}/1": ("m/1", None), f"{NAME}/2": ("m/2", None)}


@pytest.mark.parametrize("text, message", [
    ("m", "expected NAME=ALIAS:WEIGHT"),
    ("m=production", "is not ALIAS:WEIGHT"),
    ("m=production:-1", "is not ALIAS:WEIGHT"),
    ("m=production:0,staging:0", "more than 0"),
    ("m=prod uction:1", "is not ALIAS:WEIGHT"),
])
def test_bad_route_options_say_what_is_expected(text, message):
    with pytest.raises(RouteError, match=message):
        parse_route_option(text)


def test_routes_file(tmp_path):
    f = tmp_path / "routes.yaml"
    f.write_text("seed: 3\nroutes:\n  m: {production: 90, staging: 10}\n")
    splits, seed = read_routes_file(f)
    assert str(splits["m"]) == "production:90,staging:10" and seed == 3
    for text, message in (("routes: {m: {production: ninety}}", "routes.m.production: weight 'ninety'"),
                          ("routs: {}", "top-level keys allowed: routes, seed"),
                          ("routes: [1]", "must map a model name"),
                          ("seed: x", "seed must be an integer"),
                          ("routes: {m: [", "cannot read the routes file")):
        f.write_text(text)
        with pytest.raises(RouteError, match=message):
            read_routes_file(f)


def test_optional_inputs_go_only_to_packages_that_declare_them():
    """A package built before `priority`/`tenant` (issue 26) or `speculative` (issue 27) would refuse
    a request carrying them: the gateway sends what the model's config declares."""
    pytest.importorskip("tritonclient.grpc")
    from pipeline.serving.gateway import CompletionRequest, triton_inputs

    req = CompletionRequest(model="m", prompt="hi", speculative=False)
    names = lambda declared: {i.name() for i in triton_inputs("hi", req, (0, "team"), declared)}  # noqa: E731
    assert names(frozenset()) == {"text_input", "stream", "temperature", "top_p"}
    assert names(frozenset({"priority", "tenant", "speculative"})) >= {"priority", "tenant", "speculative"}
    default = triton_inputs("hi", CompletionRequest(model="m", prompt="hi"), None, frozenset({"speculative"}))
    assert "speculative" not in {i.name() for i in default}  # the package's own setting unless a request turns it off
