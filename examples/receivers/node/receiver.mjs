// A minimal jobhook receiver: verifies each delivery with the official `standardwebhooks` library,
// drops duplicates by `webhook-id`, and answers 204 at once.
//
//   npm install standardwebhooks
//   JOBHOOK_SIGNING_SECRET=whsec_... node receiver.mjs [PORT]

import http from "node:http";
import { Webhook } from "standardwebhooks";

const verifier = new Webhook(process.env.JOBHOOK_SIGNING_SECRET);
const seen = new Set(); // webhook-ids already handled; use your database in production
const port = Number(process.argv[2] ?? 8000);

http
  .createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks).toString("utf8"); // verify the raw body
      let job;
      try {
        job = verifier.verify(body, req.headers);
      } catch (e) {
        console.log(`REJECTED: signature did not verify (${e.message})`);
        res.writeHead(400).end();
        return;
      }
      const id = req.headers["webhook-id"];
      if (seen.has(id)) {
        console.log(`duplicate ${id}, already handled`);
      } else {
        seen.add(id);
        // A subscription registered with "payload": "envelope" gets the job status as `data`.
        const status = job.type ? job.data : job;
        console.log(`verified ${id} (${req.headers["jobhook-event-type"]}): job ${status.job_id} is ${status.status}`);
      }
      res.writeHead(204).end();
    });
  })
  .listen(port, "127.0.0.1", () => console.log(`receiver listening on http://127.0.0.1:${port}`));
