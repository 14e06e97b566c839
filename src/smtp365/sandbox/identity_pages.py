"""HTML pages of the identity platform: sign-in, device code entry, errors, form_post.

Field names follow Entra ID's own pages (``login``, ``passwd``, ``otc``) so a test acting
as the browser posts what a browser would. Every value is HTML-escaped. Error pages put
the AADSTS text in an element with ``id="error-code"`` for scripts to find.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

__all__ = [
    "device_code_done_page",
    "device_code_page",
    "error_page",
    "form_post_page",
    "index_page",
    "signed_out_page",
    "sign_in_page",
]

_STYLE = """
body{font-family:"Segoe UI",system-ui,sans-serif;background:#f2f2f2;margin:0}
main{max-width:440px;margin:8vh auto;background:#fff;padding:44px;box-shadow:0 2px 6px #0003}
.banner{font-size:12px;color:#666;margin-bottom:16px}
h1{font-size:24px;font-weight:600;margin:0 0 12px}
label{display:block;margin-top:12px;font-size:14px}
input[type=text],input[type=email],input[type=password]{width:100%;padding:6px 0;border:0;
border-bottom:1px solid #666;font-size:15px;outline:none}
button{margin-top:24px;padding:6px 24px;font-size:15px;border:0;background:#0067b8;color:#fff}
button.secondary{background:#ccc;color:#000;margin-right:8px}
.alert{color:#e81123;margin:12px 0}
.code{font-family:monospace;font-size:12px;color:#666;word-break:break-word}
.meta{font-size:12px;color:#666;margin-top:24px}
"""

_BANNER = "smtp365 sandbox &middot; Microsoft Entra ID look-alike"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main><div class="banner">{_BANNER}</div>{body}</main></body></html>\n'
    )


def _hidden(fields: Mapping[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items()
    )


def _alert(message: str | None, code_text: str | None) -> str:
    if not message and not code_text:
        return ""
    parts = ['<div class="alert" id="error" role="alert">']
    if message:
        parts.append(f"<p>{escape(message)}</p>")
    if code_text:
        parts.append(f'<p class="code" id="error-code">{escape(code_text)}</p>')
    parts.append("</div>")
    return "".join(parts)


def sign_in_page(
    *,
    action: str,
    hidden: Mapping[str, str],
    app_name: str,
    login: str = "",
    message: str | None = None,
    code_text: str | None = None,
) -> str:
    """The sign-in form of ``/authorize``; posts ``login`` and ``passwd`` with ``hidden``."""
    body = (
        "<h1>Sign in</h1>"
        f"<p>to continue to <strong>{escape(app_name)}</strong></p>"
        f"{_alert(message, code_text)}"
        f'<form method="post" action="{escape(action)}">{_hidden(hidden)}'
        '<label for="login">Email</label>'
        f'<input type="email" id="login" name="login" value="{escape(login)}" '
        'autocomplete="username" placeholder="someone@example.com" required>'
        '<label for="passwd">Password</label>'
        '<input type="password" id="passwd" name="passwd" autocomplete="current-password" '
        'placeholder="Password">'
        '<button type="submit">Sign in</button></form>'
    )
    return _page("Sign in to your account", body)


def error_page(code_text: str, *, trace_id: str, correlation_id: str, timestamp: str) -> str:
    """What Entra ID shows when it cannot send the user back to the app."""
    body = (
        "<h1>Sign in</h1>"
        "<p>Sorry, but we're having trouble signing you in.</p>"
        f'<p class="code" id="error-code">{escape(code_text)}</p>'
        f'<div class="meta">Request Id: {escape(trace_id)}<br>'
        f"Correlation Id: {escape(correlation_id)}<br>Timestamp: {escape(timestamp)}</div>"
    )
    return _page("Sign in to your account", body)


def form_post_page(action: str, fields: Mapping[str, str]) -> str:
    """``response_mode=form_post``: a form that posts the answer to the redirect URI."""
    return (
        "<html><head><title>Working...</title></head><body>"
        f'<form method="POST" name="hiddenform" action="{escape(action)}">{_hidden(fields)}'
        "<noscript><p>Script is disabled. Click Submit to continue.</p>"
        '<input type="submit" value="Submit" /></noscript></form>'
        '<script language="javascript">document.forms[0].submit();</script>'
        "</body></html>\n"
    )


def device_code_page(
    *,
    action: str,
    code: str = "",
    login: str = "",
    message: str | None = None,
    code_text: str | None = None,
) -> str:
    """``/devicelogin``: the code (``otc``), the user's credentials, Continue or Cancel."""
    body = (
        "<h1>Enter code</h1>"
        "<p>Enter the code displayed on your app or device, then sign in.</p>"
        f"{_alert(message, code_text)}"
        f'<form method="post" action="{escape(action)}">'
        '<label for="otc">Code</label>'
        f'<input type="text" id="otc" name="otc" value="{escape(code)}" autocomplete="off" '
        'placeholder="Code" required>'
        '<label for="login">Email</label>'
        f'<input type="email" id="login" name="login" value="{escape(login)}" '
        'autocomplete="username" placeholder="someone@example.com">'
        '<label for="passwd">Password</label>'
        '<input type="password" id="passwd" name="passwd" autocomplete="current-password" '
        'placeholder="Password">'
        '<button type="submit" name="action" value="cancel" class="secondary">Cancel</button>'
        '<button type="submit" name="action" value="continue">Continue</button></form>'
    )
    return _page("Enter code", body)


def device_code_done_page(app_name: str, *, declined: bool = False) -> str:
    if declined:
        text = "You have declined to sign in to the application on your device."
    else:
        text = (
            f"You have signed in to the {app_name} application on your device. "
            "You may now close this window."
        )
    return _page(app_name, f'<h1>{escape(app_name)}</h1><p id="result">{escape(text)}</p>')


def signed_out_page() -> str:
    return _page(
        "Sign out",
        "<h1>You signed out of your account</h1>"
        "<p>It's a good idea to close all browser windows.</p>",
    )


def index_page(authority: str, tenant_id: str) -> str:
    """``GET /``: where the endpoints are, for a human with a browser."""
    config = f"/{tenant_id}/v2.0/.well-known/openid-configuration"
    body = (
        "<h1>Identity platform</h1>"
        f"<p>Authority: <code>{escape(authority)}</code></p>"
        f'<p><a href="{escape(config)}">OpenID configuration</a> &middot; '
        '<a href="/devicelogin">Device login</a></p>'
    )
    return _page("smtp365 sandbox identity platform", body)
