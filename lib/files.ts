// Small file helpers shared by the loaders, the training loop and the reports.

import { closeSync, fsyncSync, openSync, readFileSync, renameSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";

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
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    write(tmp);
    renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
}

/**
 * An exclusive lock on `dir` for this process: `dir/.lock` holds its pid. A lock whose process has ended
 * (killed, crashed) is taken over; one whose process runs is an error naming it. Returns the release.
 */
export function lockDirectory(dir: string, what: string): () => void {
  const path = join(dir, ".lock");
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (e) {
      return (e as NodeJS.ErrnoException).code === "EPERM";
    }
  };
  for (let attempt = 0; ; attempt++) {
    let fd: number;
    try {
      fd = openSync(path, "wx");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      let pid = Number.NaN;
      try {
        pid = Number(readFileSync(path, "utf8").trim());
      } catch {
        // removed meanwhile: try again
      }
      if (Number.isInteger(pid) && pid > 0 && alive(pid))
        throw new Error(
          `${dir}: ${what} is in use by process ${pid}${pid === process.pid ? " (this one)" : ""}; wait for it to end or stop it`,
        );
      if (attempt > 0)
        throw new Error(`${dir}: ${what}: its .lock could not be taken (another process took it)`);
      rmSync(path, { force: true }); // its process has ended
      continue;
    }
    try {
      writeAll(fd, Buffer.from(String(process.pid)));
    } finally {
      closeSync(fd);
    }
    return () => {
      try {
        if (readFileSync(path, "utf8") === String(process.pid)) rmSync(path, { force: true });
      } catch {
        // already gone
      }
    };
  }
}
