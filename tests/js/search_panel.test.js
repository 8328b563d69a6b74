// panels/search.js, the dataset browser's CLIP search, run as the browser runs it against a fake host
// under Dataloop's JS SDK (fake_host.js): success, no deployed model, a failed execution, a dataset not
// embedded, a cold start, several models. `node --test` (tests/js); .ci/run runs it.
'use strict'

const { test } = require('node:test')
const assert = require('node:assert/strict')
const { FakeHost, loadPanel } = require('./fake_host.js')
const fixtures = require('./fixtures.json')
const manifest = require('../../dataloop.json')

const PROJECT = { id: '65f000000000000000000001', name: 'My Project' }
const DATASET = { id: fixtures.not_embedded.dataset_id, name: 'photos', itemsCount: 2 }
const BROWSER_QUERY = { filter: fixtures.browser_filter, resource: 'items', page: 0, pageSize: 100 }

function clipModel(name, { deployed = true, dpkName = manifest.name, serviceId = `service-${name}` } = {}) {
  return {
    id: `model-${name}`, name, status: deployed ? 'deployed' : 'trained', moduleName: 'clip-module',
    context: { project: PROJECT.id }, app: { id: 'app-1', dpkName, dpkVersion: '2.0.0', dpkId: 'dpk-1' },
    configuration: { model_name: 'ViT-B/32' }, outputType: 'embedding', inputType: 'image',
    metadata: { system: deployed ? { deploy: { services: [serviceId] } } : {} },
  }
}

function serviceOf(model) {
  return { id: model.metadata.system.deploy.services[0], name: `${model.name}-svc`, projectId: PROJECT.id,
    moduleName: 'clip-module', metadata: { ml: { modelId: model.id } } }
}

const SUCCESS = { status: 'success', percentComplete: 100,
  output: { items: fixtures.search_json.results.map((r) => ({ item_id: r.id })), json: fixtures.search_json } }

function host(models, onExecution) {
  return new FakeHost({ project: PROJECT, dataset: DATASET, models,
    services: models.filter((m) => m.status === 'deployed').map(serviceOf), onExecution })
}

function assertKnownCalls(fake) {
  assert.deepEqual(fake.unknown, [], 'the panel used SDK calls the fake host does not implement')
}

test('the manifest\'s panel runs this script\'s run() in the dataset browser\'s search slot', () => {
  const [panel] = manifest.components.panels
  const [slot] = panel.supportedSlots
  assert.equal(slot.type, 'datasetBrowserSearch')
  assert.deepEqual(slot.configuration.invoke.type, 'script')
  assert.equal(slot.configuration.invoke.namespace, 'run')
  assert.match(slot.configuration.invoke.source, /\/panels\/search\.js$/)
  assert.deepEqual(slot.configuration.layout.schema.fields.map((f) => [f.name, f.widget]),
    [['Text Box', 'dl-input'], ['Model', 'dl-input']])
  const toolbar = manifest.components.toolbars.find((t) => t.invoke.namespace === panel.name)
  assert.equal(toolbar.location, 'datasetBrowserSearchOption')
  assert.equal(toolbar.invoke.type, 'panel')
  const { constants } = loadPanel(host([], () => []))
  assert.equal(constants.CLIP_APP, manifest.name)
  const functions = manifest.components.modules[0].functions.map((f) => f.name)
  assert.ok(functions.includes(constants.SEARCH_FUNCTION))
})

for (const [shape, output] of [
  ['by output name', SUCCESS.output],
  ['as a list in order', [SUCCESS.output.items, SUCCESS.output.json]],
  ['the json alone', SUCCESS.output.json],
]) {
  test(`success: runs search_dataset on the deployed model's service and returns its DQL (output ${shape})`, async () => {
    const tuned = clipModel('clip-tuned')
    const others = [clipModel('clip-idle', { deployed: false }), clipModel('smart-search', { dpkName: 'clip-image-search' })]
    const fake = host([tuned, ...others], () => [{ status: 'in-progress' }, { ...SUCCESS, output }])
    const { run, clock, constants } = loadPanel(fake)

    const query = await run({ 'Text Box': '  a dog on the beach ' }, BROWSER_QUERY)

    assert.deepEqual(query, fixtures.search_json.query)
    assert.deepEqual(fake.created, [{
      functionName: 'search_dataset', serviceName: 'clip-tuned-svc', projectId: PROJECT.id,
      input: { dataset: { dataset_id: DATASET.id }, text: 'a dog on the beach', k: constants.RESULTS,
        filters: { filter: fixtures.browser_filter } },
    }])
    assert.deepEqual(fake.toasts(), [])
    assert.equal(clock.now, 2 * constants.POLL_MS)  // created -> in-progress -> success
    assert.ok(fake.calls.includes('service:read') && fake.calls.includes('execution:read'))
    assertKnownCalls(fake)
  })
}

test('no deployed CLIP model: an error toast, the browser\'s own query, no execution', async () => {
  const fake = host([clipModel('clip-idle', { deployed: false }), clipModel('other', { dpkName: 'clip-image-search' })],
    () => assert.fail('no execution expected'))
  const { run } = loadPanel(fake)
  const query = await run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  assert.deepEqual(query, { filter: fixtures.browser_filter, resource: 'items' })
  assert.equal(fake.created.length, 0)
  const [message] = fake.toasts('error')
  assert.match(message, /No deployed CLIP model in this project: deploy one/)
  assertKnownCalls(fake)
})

test('a failed execution: its one-line reason in an error toast', async () => {
  const fake = host([clipModel('openai-clip')], () => [{ status: 'failed',
    message: 'ClipAdapterFailure: CLIP adapter: k must be from 1 to 1000, got 0' }])
  const { run } = loadPanel(fake)
  const query = await run({ 'Text Box': 'a dog' }, null)
  assert.deepEqual(query, { filter: { $and: [{ hidden: false }, { type: 'file' }] }, resource: 'items' })
  assert.deepEqual(fake.toasts('error'), ['CLIP search failed: k must be from 1 to 1000, got 0'])
  assertKnownCalls(fake)
})

test('a dataset the model has not embedded (no or an empty feature set): the toast says what to do', async () => {
  const fake = host([clipModel(fixtures.not_embedded.model)],
    () => [{ status: 'in-progress' }, { status: 'failed', message: fixtures.not_embedded.message }])
  const { run } = loadPanel(fake)
  await run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  const [message] = fake.toasts('error')
  assert.equal(message, `CLIP search failed: ${fixtures.not_embedded.message.split('CLIP adapter: ')[1]}`)
  assert.match(message, /embed the dataset first: model\.embed_datasets\(dataset_ids=\[/)
  assertKnownCalls(fake)
})

test('a cold start: the service does not pick the execution up within the wait, a toast says to retry', async () => {
  const fake = host([clipModel('openai-clip')], () => [{ status: 'created' }])
  const { run, clock, constants } = loadPanel(fake)
  const query = await run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  assert.deepEqual(query, { filter: fixtures.browser_filter, resource: 'items' })
  assert.deepEqual(fake.toasts('warning'), [
    'The CLIP model\'s service is starting (it scales to zero when idle): search again in a minute.'])
  assert.equal(clock.now, constants.WAIT_MS)
  assert.equal(fake.executions.get('execution-1').reads, constants.WAIT_MS / constants.POLL_MS)
  assertKnownCalls(fake)
})

test('a search still running at the end of the wait: a toast, not a hang', async () => {
  const fake = host([clipModel('openai-clip')], () => [{ status: 'in-progress' }])
  const { run } = loadPanel(fake)
  await run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  assert.deepEqual(fake.toasts('warning'), ['The CLIP search is taking longer than usual: search again in a moment.'])
})

test('several deployed models: the Model field picks one; without it, a toast lists them', async () => {
  const models = [clipModel('clip-a'), clipModel('clip-b')]
  let fake = host(models, () => [SUCCESS])
  await loadPanel(fake).run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  assert.equal(fake.created.length, 0)
  assert.deepEqual(fake.toasts('warning'), [
    'Several CLIP models are deployed (clip-a, clip-b): type the one to search with in the Model field.'])

  fake = host(models, () => [SUCCESS])
  assert.deepEqual(await loadPanel(fake).run({ 'Text Box': 'a dog', Model: 'clip-b' }, BROWSER_QUERY),
    fixtures.search_json.query)
  assert.equal(fake.created[0].serviceName, 'clip-b-svc')

  fake = host(models, () => [SUCCESS])
  await loadPanel(fake).run({ 'Text Box': 'a dog', Model: 'clip-c' }, BROWSER_QUERY)
  assert.deepEqual(fake.toasts('error'), ['No deployed CLIP model named "clip-c"; deployed: clip-a, clip-b.'])
})

test('an empty query asks for words; a browser join is left out, said so', async () => {
  let fake = host([clipModel('openai-clip')], () => [SUCCESS])
  await loadPanel(fake).run({ 'Text Box': '   ' }, BROWSER_QUERY)
  assert.deepEqual(fake.calls, [])
  assert.match(fake.toasts('warning')[0], /Type what to look for/)

  fake = host([clipModel('openai-clip')], () => [SUCCESS])
  const withJoin = { ...BROWSER_QUERY, join: { on: { resource: 'annotations', local: 'itemId', forigen: 'id' },
    filter: { label: 'dog' } } }
  assert.deepEqual(await loadPanel(fake).run({ 'Text Box': 'a dog' }, withJoin), fixtures.search_json.query)
  assert.deepEqual(fake.created[0].input.filters, { filter: fixtures.browser_filter })
  assert.deepEqual(fake.toasts('info'), ['CLIP search keeps the item filters but not the annotation filters of this view.'])
})

test('a host error (a service gone) becomes an error toast and the browser\'s query', async () => {
  const model = clipModel('openai-clip')
  const fake = new FakeHost({ project: PROJECT, dataset: DATASET, models: [model], services: [], onExecution: () => [] })
  const query = await loadPanel(fake).run({ 'Text Box': 'a dog' }, BROWSER_QUERY)
  assert.deepEqual(query, { filter: fixtures.browser_filter, resource: 'items' })
  assert.match(fake.toasts('error')[0], /^CLIP search failed: service service-openai-clip not found/)
})
