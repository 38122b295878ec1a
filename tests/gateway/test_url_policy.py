"""Which image URLs the gateway fetches: http(s) on an allowed host, and — unless the host is named
in the list — only hosts that resolve to public addresses (no loopback, metadata, private ranges)."""

import pytest

from gateway.runs import check_url, internal_address
from svp.service import ServiceError


def test_names_resolving_to_internal_addresses_are_found():
    assert internal_address("localhost") in ("127.0.0.1", "::1")  # a name that resolves to loopback
    assert internal_address("127.0.0.1") == "127.0.0.1"
    assert internal_address("169.254.169.254") == "169.254.169.254"  # cloud metadata
    assert internal_address("10.1.2.3") == "10.1.2.3" and internal_address("192.168.0.1") == "192.168.0.1"
    assert internal_address("::1") == "::1"
    assert internal_address("93.184.215.14") is None  # a public address literal: no DNS needed
    assert internal_address("no-such-host.invalid") is None  # unresolvable: the fetch reports it


@pytest.mark.parametrize("url", ["http://localhost:8000/a.png", "http://127.0.0.1/a.png",
                                 "http://169.254.169.254/latest/meta-data", "http://[::1]/a.png"])
def test_a_wildcard_does_not_open_the_internal_network(url):
    with pytest.raises(ServiceError) as err:
        check_url(url, ["*"])
    assert err.value.status == 400 and "internal address" in err.value.message and err.value.param == "images"


def test_a_host_named_in_the_list_may_be_internal():
    check_url("http://localhost:8000/a.png", ["localhost"])
    check_url("http://127.0.0.1:9/a.png", ["127.0.0.1"])
    check_url("https://93.184.215.14/a.png", ["*"])  # public, allowed by the wildcard


@pytest.mark.parametrize("url, allowed, words", [
    ("ftp://localhost/a.png", ["localhost"], "scheme"),
    ("http://evil.example.com/a.png", ["good.example.com"], "not in the allowed hosts"),
    ("http:///a.png", ["*"], "not in the allowed hosts"),
])
def test_scheme_and_host_list_still_apply(url, allowed, words):
    with pytest.raises(ServiceError, match=words):
        check_url(url, allowed)
