"""A minimal jobhook receiver: verifies each delivery with the official `standardwebhooks` library,
drops duplicates by `webhook-id`, and answers 204 at once.

    pip install standardwebhooks
    JOBHOOK_SIGNING_SECRET=whsec_... python3 receiver.py [PORT]

Standard library HTTP server, so the only dependency is the verifier.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET = os.environ["JOBHOOK_SIGNING_SECRET"]
verifier = Webhook(SECRET)
seen = set()  # webhook-ids already handled; use your database in production


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            job = verifier.verify(body, headers)
        except WebhookVerificationError as e:
            print(f"REJECTED: signature did not verify ({e})", flush=True)
            self.send_response(400)
            self.end_headers()
            return
        webhook_id = headers["webhook-id"]
        if webhook_id in seen:
            print(f"duplicate {webhook_id}, already handled", flush=True)
        else:
            seen.add(webhook_id)
            # A subscription registered with "payload": "envelope" gets the job status as `data`.
            status = job["data"] if "type" in job else job
            event = headers.get("jobhook-event-type")
            print(f"verified {webhook_id} ({event}): job {status['job_id']} is {status['status']}", flush=True)
            print(json.dumps(job, indent=2), flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    print(f"receiver listening on http://127.0.0.1:{port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
