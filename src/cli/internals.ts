/**
 * What the CLI takes from inside the library rather than from its public entries, all in this one file
 * (test/cli.unit.test.ts holds every other CLI module to `tidings`, `tidings/*`, node: and its own files).
 *
 * tidings/postgres offers a driver only inside a backbone, whose open() migrates and starts the notifier,
 * retention and the scheduler: none of which an operator's `tidings status` should do. So the CLI opens the
 * driver itself, with its own small pool (database.ts), and judges the driver's errors and names by the
 * backbone's own rules, so that both word them alike. A public `tidings/postgres` export of the driver
 * would retire this file.
 */
export { loadPackage } from '../core/packages.ts';
export { connectionError, describeCause, isConnectionError } from '../postgres/connection/errors.ts';
export { checkIdentifier } from '../postgres/connection/identifiers.ts';
export { pgDriver } from '../postgres/connection/pg.ts';
export { describeUrl, urlProblem } from '../postgres/connection/url.ts';
