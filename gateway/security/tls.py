"""The public listener's TLS: one SSLContext, reloaded in place on SIGHUP.

TLS 1.2 and 1.3 only, ALPN http/1.1 (we speak nothing else), optional client
certificates (mTLS). A reload loads the new files into a scratch context first, so
a broken or mismatched pair is reported and the live context keeps serving the old
certificate; then it loads them into the live context, which OpenSSL applies to new
handshakes only: open connections keep the certificate they negotiated.
"""

from __future__ import annotations

import ssl


class TlsError(ValueError):
    """Certificate files the gateway cannot use."""


def _load(context: ssl.SSLContext, cert: str, key: str, client_ca: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"TLS: {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"TLS certificate {cert} / key {key}: {exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except FileNotFoundError:
            raise TlsError(f"TLS client CA {client_ca}: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"TLS client CA {client_ca}: {exc}") from None


def _new_context(client_ca: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsFiles:
    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.context = _new_context(client_ca)
        _load(self.context, cert, key, client_ca)

    def reload(self) -> None:
        """Raise TlsError (live context untouched) if the files on disk are not usable."""
        _load(_new_context(self.client_ca), self.cert, self.key, self.client_ca)
        _load(self.context, self.cert, self.key, self.client_ca)
