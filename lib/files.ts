// Small file helpers shared by the loaders, the training loop and the reports.

import { randomBytes } from "node:crypto";
import {
  appendFileSync,
  closeSync,
  existsSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname } from "node:os";
import { dirname, join, resolve } from "node:path";
import { threadId } from "node:worker_threads";
import { addon } from "./native.js";

/**
 * `e` with `path` at the head of its message (its code and stack kept): Node's write errors name no file
 * ("ENOSPC: no space left on device, write"). An error that names the path already is returned as it is.
 */
export function fileError(e: unknown, path: string): unknown {
  if (e instanceof Error && !e.message.includes(path)) e.message = `${path}: ${e.message}`;
  return e;
}

/**
 * mkdir -p whose error says why: Node's recursive mkdir reports ENOENT for any failure under an existing
 * directory (a read-only file system, a permission), so the first missing directory is then made alone,
 * which fails with the real reason.
 */
export function ensureDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw fileError(e, dir);
    let first = resolve(dir);
    while (!existsSync(dirname(first)) && dirname(first) !== first) first = dirname(first);
    try {
      mkdirSync(first);
    } catch (e2) {
      throw fileError(e2, first);
    }
    try {
      mkdirSync(dir, { recursive: true });
    } catch (e3) {
      throw fileError(e3, dir);
    }
  }
}

/**
 * Makes `dir` (and its parents) and checks that a file can be written in it, so that work whose results go
 * there fails before it starts, naming the directory and the reason.
 */
export function ensureWritableDir(dir: string): void {
  ensureDir(dir);
  const probe = join(dir, `.priortune-probe-${process.pid}`);
  try {
    writeFileSync(probe, "");
  } catch (e) {
    throw fileError(e, dir);
  } finally {
    rmSync(probe, { force: true });
  }
}

/** appendFileSync with the path in its errors. */
export function appendToFile(path: string, text: string): void {
  try {
    appendFileSync(path, text);
  } catch (e) {
    throw fileError(e, path);
  }
}

/** JSON.parse of a file, with the file's path in the error. */
export function readJsonFile(path: string): unknown {
  const text = readFileSync(path, "utf8");
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${path}: not valid JSON (${(e as Error).message})`);
  }
}

/** writeSync until every byte is written (one write(2) stops at 2 GiB - 4 KiB). */
export function writeAll(fd: number, bytes: Uint8Array): void {
  for (let done = 0; done < bytes.byteLength; )
    done += writeSync(fd, bytes, done, Math.min(bytes.byteLength - done, 1 << 30));
}

/** Flushes a written file to the disk (before a rename makes it the one that counts). */
export function fsyncFile(path: string): void {
  const fd = openSync(path, "r+");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Writes a file so that a crash leaves either the old contents or the new, never a torn file: a temporary
 * file beside it, fsync'd, then renamed over it.
 */
export function atomicWrite(path: string, data: string | Uint8Array): void {
  replaceWith(path, (tmp) => {
    const fd = openSync(tmp, "w");
    try {
      writeAll(fd, typeof data === "string" ? Buffer.from(data) : data);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  });
}

/**
 * `write(tmp)` fills a temporary file beside `path` (flushed before it returns), which then replaces
 * `path`; if the write fails, the temporary file is removed and `path` keeps its old contents.
 */
export function replaceWith(path: string, write: (tmp: string) => void): void {
  const tmp = `${path}.tmp-${process.pid}${threadId ? `-${threadId}` : ""}`; // threads of one process apart
  try {
    write(tmp);
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw fileError(e, path);
  }
}

/**
 * The lock files this process holds (its own pid in a lock it does not hold: an earlier incarnation's), in
 * the addon: one set for every worker thread of the process (each thread has its own copy of this module).
 */
const heldLocks = {
  add: (path: string) => addon().heldLock("add", path),
  delete: (path: string) => addon().heldLock("delete", path),
  has: (path: string) => addon().heldLock("has", path),
};

/**
 * An exclusive lock on `dir` for this process: `dir/.lock` holds "pid host". A lock whose process has ended
 * (killed, crashed; also a container's earlier run under the same pid) is taken over; one whose process
 * runs, or one from another host (whose processes cannot be checked), is an error naming it. The file is
 * created whole (written aside, then linked into place) and a stale one is moved aside and checked before
 * it is replaced, so two processes starting at once cannot both hold it. Returns the release.
 */
export function lockDirectory(dir: string, what: string): () => void {
  // One key for every spelling of the directory (relative, absolute, through links): the registry of held
  // locks compares paths.
  let real = resolve(dir);
  try {
    real = realpathSync(real);
  } catch {
    // not there yet: its lock file cannot be made either, and that error names it
  }
  const path = join(real, ".lock");
  const mine = `${process.pid} ${hostname()}`;
  const unique = () => `${process.pid}-${randomBytes(6).toString("hex")}`;
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "EPERM";
    }
  };
  const read = (file: string): string | null => {
    try {
      return readFileSync(file, "utf8").trim();
    } catch {
      return null;
    }
  };
  for (let attempt = 0; attempt < 8; attempt++) {
    const aside = `${path}.new-${unique()}`;
    writeFileSync(aside, mine);
    let taken = false;
    try {
      linkSync(aside, path); // fails if a lock is there: creation and content in one step
      taken = true;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== "EEXIST") {
        // A file system without hard links: exclusive creation, then the content.
        try {
          writeFileSync(path, mine, { flag: "wx" });
          taken = true;
        } catch (e2) {
          if ((e2 as NodeJS.ErrnoException).code !== "EEXIST") throw e2;
        }
      }
    } finally {
      rmSync(aside, { force: true });
    }
    if (taken) {
      heldLocks.add(path);
      return () => {
        heldLocks.delete(path);
        if (read(path) === mine) rmSync(path, { force: true });
      };
    }
    const seen = read(path);
    if (seen === null) continue; // released meanwhile
    const [pidText, host] = seen.split(" ");
    const pid = Number(pidText);
    if (Number.isInteger(pid) && pid > 0) {
      if (host !== undefined && host !== hostname())
        throw new Error(
          `${dir}: ${what} is locked by process ${pid} on host ${host} (if it no longer runs, delete ${path})`,
        );
      const inUse = pid === process.pid ? heldLocks.has(path) : alive(pid);
      if (inUse)
        throw new Error(
          `${dir}: ${what} is in use by process ${pid}${pid === process.pid ? " (this one)" : ""}; wait for it to end or stop it`,
        );
    }
    // Stale: moved aside, then checked to be the lock judged (another process may have replaced it).
    const stale = `${path}.stale-${unique()}`;
    try {
      renameSync(path, stale);
    } catch {
      continue; // gone meanwhile
    }
    if (read(stale) !== seen) {
      try {
        linkSync(stale, path); // a fresh lock was moved: put it back
      } catch {
        // its owner's release or another lock is there now
      }
    }
    rmSync(stale, { force: true });
  }
  throw new Error(`${dir}: ${what}: its .lock could not be taken (other processes keep taking it)`);
}
