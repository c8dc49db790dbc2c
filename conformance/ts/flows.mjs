// Conformance: the unmodified official TypeScript SDK (npm @tenkicloud/sandbox 0.5.4) against a
// live server.
//
//   cd conformance/ts && npm ci
//   TENKI_API_ENDPOINT=http://127.0.0.1:PORT TENKI_API_KEY=tk_... node flows.mjs
//
// The client is built from the environment only (`new TenkiSandbox()` reads TENKI_API_ENDPOINT and
// TENKI_API_KEY; the endpoint is `tenki serve`'s grpc_endpoint). It creates the session it acts
// on, writes a file, then runs the TypeScript calls of the snapshots spec as written
// (createSnapshotAndWait, then createAndWait({snapshotId})), reads the file back in the restored
// session, checks SnapshotNotFoundError, pauses and resumes, and terminates/deletes everything it
// made. One line per step; the first failure names the step and exits 1.

import {
  SnapshotNotFoundError,
  TenkiSandbox,
  stdoutText,
} from "@tenkicloud/sandbox";

const T0 = Date.now();
const dec = new TextDecoder();
const made = { sessions: [], snapshots: [] };
const secs = (t) => ((Date.now() - t) / 1000).toFixed(1);

class Failed extends Error {}

function check(cond, msg) {
  if (!cond) throw new Failed(msg);
}

async function step(name, fn) {
  const t = Date.now();
  let out;
  try {
    out = await fn();
  } catch (err) {
    console.log(`FAIL ${name}: ${err?.constructor?.name ?? "Error"}: ${err?.message ?? err}`);
    if (!(err instanceof Failed) && err?.stack) console.log(err.stack);
    throw err;
  }
  console.log(`ok   ${name} (${secs(t)}s)${typeof out === "string" ? `: ${out}` : ""}`);
  return out;
}

async function cleanup(sandbox) {
  let ok = true;
  for (const s of made.sessions.reverse()) {
    try {
      await s.close(); // TerminateSession
    } catch (err) {
      ok = false;
      console.log(`cleanup: terminate ${s.id}: ${err?.message ?? err}`);
    }
  }
  for (const id of made.snapshots.reverse()) {
    try {
      await sandbox.deleteSnapshot(id);
    } catch (err) {
      if (err instanceof SnapshotNotFoundError) continue;
      ok = false;
      console.log(`cleanup: delete snapshot ${id}: ${err?.message ?? err}`);
    }
  }
  return ok;
}

async function flows(sandbox) {
  const tag = Math.random().toString(16).slice(2, 10);

  const session = await step("create the session (createAndWait)", async () => {
    const s = await sandbox.createAndWait({ name: `conf-ts-${tag}`, timeoutMs: 600_000 });
    made.sessions.push(s);
    check(s.state === "RUNNING", `state ${s.state}`);
    const got = await sandbox.get(s.id);
    check(got.state === "RUNNING", `get: ${got.state}`);
    const listed = await sandbox.list();
    check(listed.some((x) => x.id === s.id), "the new session is not in list()");
    return s;
  });

  await step("run and exec: stdout, stderr, exit code", async () => {
    const r = await session.run(["sh", "-c", "echo out; echo err >&2; exit 3"]);
    check(r.exitCode === 3, `exit code ${r.exitCode}`);
    check(dec.decode(r.stdout) === "out\n", `stdout ${JSON.stringify(dec.decode(r.stdout))}`);
    check(dec.decode(r.stderr) === "err\n", `stderr ${JSON.stringify(dec.decode(r.stderr))}`);
    const e = await session.exec("echo", { args: ["hello"] });
    check(e.exitCode === 0 && stdoutText(e) === "hello" && dec.decode(e.stdout) === "hello\n",
      `exec: ${e.exitCode} ${JSON.stringify(stdoutText(e))}`);
  });

  await step("write a file in the session", async () => {
    await session.writeFile("/home/tenki/conformance.txt", "written before the snapshot\n");
    const back = dec.decode(await session.readFile("/home/tenki/conformance.txt"));
    check(back === "written before the snapshot\n", `read back ${JSON.stringify(back)}`);
  });

  // -- the spec's TypeScript calls, as written ----------------------------------------------
  const snapshot = await step('sandbox.createSnapshotAndWait(session.id, {name: "after-setup"})',
    async () => {
      const snapshot = await sandbox.createSnapshotAndWait(session.id, {
        name: "after-setup",
      });
      made.snapshots.push(snapshot.id);
      check(snapshot.state === "READY", `state ${snapshot.state}`);
      check(snapshot.sessionId === session.id, `sessionId ${snapshot.sessionId}`);
      check(snapshot.name === "after-setup", `name ${snapshot.name}`);
      const got = await sandbox.getSnapshot(snapshot.id);
      check(got.id === snapshot.id && got.state === "READY", `getSnapshot: ${got.state}`);
      const all = await sandbox.listSnapshots();
      check(all.some((x) => x.id === snapshot.id), "not in listSnapshots()");
      return snapshot;
    });

  const restored = await step("sandbox.createAndWait({snapshotId: snapshot.id})", async () => {
    // Restore as a new session
    const restored = await sandbox.createAndWait({
      snapshotId: snapshot.id,
    });
    made.sessions.push(restored);
    check(restored.id !== session.id, "the restore has the source's id");
    check(restored.state === "RUNNING", `state ${restored.state}`);
    return restored;
  });

  await step("read the file back in the restored session", async () => {
    const got = dec.decode(await restored.readFile("/home/tenki/conformance.txt"));
    check(got === "written before the snapshot\n", `got ${JSON.stringify(got)}`);
    const r = await restored.run(["cat", "/home/tenki/conformance.txt"]);
    check(dec.decode(r.stdout) === "written before the snapshot\n", "cat in the guest differs");
  });

  await step("SnapshotNotFoundError for an unknown snapshot id", async () => {
    const unknown = "snp_doesnotexist000000";
    try {
      await sandbox.getSnapshot(unknown);
      throw new Failed("getSnapshot(unknown) did not throw");
    } catch (err) {
      if (!(err instanceof SnapshotNotFoundError)) throw err;
    }
    let extra;
    try {
      extra = await sandbox.createAndWait({ snapshotId: unknown });
    } catch (err) {
      if (!(err instanceof SnapshotNotFoundError)) throw err;
      return;
    }
    made.sessions.push(extra);
    throw new Failed("createAndWait({snapshotId: unknown}) did not throw SnapshotNotFoundError");
  });

  await step("pause / resume", async () => {
    await restored.run(["sh", "-c", "echo kept-in-memory > /dev/shm/mem"]);
    await restored.pause();
    const paused = await sandbox.get(restored.id);
    check(paused.state === "PAUSED", `after pause(): ${paused.state}`);
    await restored.resume();
    const back = await sandbox.get(restored.id);
    check(back.state === "RUNNING", `after resume(): ${back.state}`);
    const r = await restored.run(["cat", "/dev/shm/mem"]);
    check(dec.decode(r.stdout) === "kept-in-memory\n", `after resume: ${dec.decode(r.stdout)}`);
  });

  await step("terminate the sessions, delete the snapshot", async () => {
    for (const s of [...made.sessions]) {
      await s.close();
      made.sessions.splice(made.sessions.indexOf(s), 1);
      const st = (await sandbox.get(s.id)).state;
      check(st === "TERMINATING" || st === "TERMINATED", `${s.id} after close(): ${st}`);
    }
    for (const id of [...made.snapshots]) {
      const d = await sandbox.deleteSnapshot(id);
      made.snapshots.splice(made.snapshots.indexOf(id), 1);
      check(d.id === id, `deleteSnapshot answered ${d.id}`);
    }
  });
}

async function main() {
  for (const v of ["TENKI_API_ENDPOINT", "TENKI_API_KEY"]) {
    if (!process.env[v]) {
      console.log(`FAIL ${v} is not set`);
      return 1;
    }
  }
  const sandbox = await step("new TenkiSandbox() from the environment", async () => new TenkiSandbox());
  let code = 0;
  try {
    await flows(sandbox);
  } catch {
    code = 1;
  } finally {
    if (!(await cleanup(sandbox))) code = code || 1;
    sandbox.close();
  }
  console.log(`${code === 0 ? "PASS" : "FAILED"} typescript conformance (${secs(T0)}s)`);
  return code;
}

process.exitCode = await main();
// the SDK's HTTP/2 sessions may keep the event loop alive: leave once done
setTimeout(() => process.exit(process.exitCode), 100).unref();
