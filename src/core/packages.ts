import { TidingsError } from './errors.ts';

/**
 * Loads a package a backbone needs but Tidings does not install (pg, PGlite, amqplib, nats): `loading` is
 * the caller's `import('name')`, written out where it is used so that bundlers see it. A failure becomes a
 * PACKAGE_UNAVAILABLE error that tells the two cases apart: not installed (with the install command), or
 * installed but failing to load (with the reason: a broken install, an unsupported version, a bundle that
 * cannot load it). Proven by test/packages.unit.test.ts and, from the packed package, tarball.smoke.test.ts.
 */
export async function loadPackage<T>(loading: Promise<T>, name: string, neededFor: string, install = name): Promise<T> {
  try {
    return await loading;
  } catch (cause) {
    throw packageError(cause, name, neededFor, install);
  }
}

/** `install`: what to give `npm install` (the package, or it and the ones that go with it). */
export function packageError(cause: unknown, name: string, neededFor: string, install = name): TidingsError {
  if (isNotInstalled(cause, name)) {
    return new TidingsError('PACKAGE_UNAVAILABLE', `${neededFor} needs the "${name}" package, which is not installed: npm install ${install}`, { cause });
  }
  const why = cause instanceof Error ? cause.message.split('\n')[0] : String(cause);
  return new TidingsError(
    'PACKAGE_UNAVAILABLE',
    `${neededFor} needs the "${name}" package: it is installed but failed to load (${why}). Reinstall it (npm install ${name}) and check that its version is within Tidings' peerDependencies`,
    { cause },
  );
}

/** Node's own words for a package that is not there: ESM's "Cannot find package 'x'", CommonJS's "Cannot find module 'x'". */
export function isNotInstalled(error: unknown, name: string): boolean {
  const code = (error as { code?: unknown } | undefined)?.code;
  if (code !== 'ERR_MODULE_NOT_FOUND' && code !== 'MODULE_NOT_FOUND') return false;
  const message = error instanceof Error ? error.message : '';
  return message.includes(`Cannot find package '${name}'`) || message.includes(`Cannot find module '${name}'`);
}
