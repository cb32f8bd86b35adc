"""Create (or delete) Azure Blob containers: blobfile has no call for it, and a write into a missing one fails.

    AZURE_STORAGE_ACCOUNT=... AZURE_STORAGE_KEY=... python3 objectstore/containers.py NAME... [--delete]

One Shared Key signed request per container to https://ACCOUNT.blob.core.windows.net (the emulator of
azurite.sh answers under that name), retried for up to 15 s while the server starts. Python's standard
library only: it runs before any virtual environment exists.
"""

import base64
import datetime
import hmac
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

API_VERSION = "2019-02-02"


def container_request(account: str, key: str, name: str, method: str) -> int:
    """PUT (create) or DELETE container ``name``; the HTTP status."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
    # urllib gives a request with a body a Content-Type of its own, so it is set, and signed, here
    content_type = "application/octet-stream" if method == "PUT" else ""
    signed = "\n".join([method, "", "", "", "", content_type, "", "", "", "", "", "",
                        f"x-ms-date:{date}", f"x-ms-version:{API_VERSION}", f"/{account}/{name}", "restype:container"])
    signature = base64.b64encode(hmac.digest(base64.b64decode(key), signed.encode(), "sha256")).decode()
    headers = {"x-ms-date": date, "x-ms-version": API_VERSION, "Authorization": f"SharedKey {account}:{signature}"}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(f"https://{account}.blob.core.windows.net/{name}?restype=container",
                                     method=method, data=b"" if method == "PUT" else None, headers=headers)
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def main(argv: list[str]) -> int:
    delete = "--delete" in argv
    names = [a for a in argv if a != "--delete"]
    account, key = os.environ["AZURE_STORAGE_ACCOUNT"], os.environ["AZURE_STORAGE_KEY"]
    method, done = ("DELETE", (202, 404)) if delete else ("PUT", (201, 409))
    for name in names:
        deadline = time.monotonic() + 15
        while True:
            try:
                status = container_request(account, key, name, method)
                break
            except OSError as err:  # the server is not listening yet
                if time.monotonic() > deadline:
                    print(f"containers.py: {account}.blob.core.windows.net does not answer: {err}", file=sys.stderr)
                    return 1
                time.sleep(0.25)
        if status not in done:
            print(f"containers.py: {method} container {name}: HTTP {status}", file=sys.stderr)
            return 1
        print(f"azurite: container {name}: {'deleted' if delete else 'ready'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
