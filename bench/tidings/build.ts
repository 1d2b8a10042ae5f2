/**
 * Tidings as the children measure it: the build the parent compiled when the run began (TIDINGS_BUILD, the
 * JavaScript `npm run build` makes and users run, compiled from src/ as it was then, so every round measures
 * the same code while src/ is being edited), or src/ itself when a child is run by hand.
 */
const build = process.env.TIDINGS_BUILD;

export function tidings<M>(entry: 'index' | 'postgres/index' | 'rabbitmq/index' | 'nats/index' | 'replica/index'): Promise<M> {
  return import(build === undefined ? new URL(`../../src/${entry}.ts`, import.meta.url).href : `${build}/${entry}.js`) as Promise<M>;
}
