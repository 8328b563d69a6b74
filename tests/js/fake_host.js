// A fake Dataloop host for panels/search.js, under Dataloop's own JS SDK (@dataloop-ai/jssdk).
//
// In the browser, `dl` is the SDK's xFrameDriver: its repositories (dl.models, dl.executions, ...) turn
// each call into a CrudMessage {scope, crud, data} and `agent.sendSync` sends it to the platform's
// frame, which answers; `dl.sendEvent` goes through `agent.sendEvent`. Here the driver and its
// repositories are the SDK's, unmodified; only the agent (the link to the host) is this fake, which
// answers from its state. A message it does not know is recorded and rejected (the test fails on it).
'use strict'

const vm = require('node:vm')
const fs = require('node:fs')
const path = require('node:path')
const { xFrameDriver } = require('@dataloop-ai/jssdk/dist/appLib/SDKDrivers/xFrameDriver')

const SCRIPT = path.resolve(__dirname, '..', '..', 'panels', 'search.js')

class FakeHost {
  constructor({ project, dataset, models = [], services = [], onExecution }) {
    this.project = project
    this.dataset = dataset
    this.models = models
    this.services = services
    this.onExecution = onExecution  // (payload) => [execution states the platform reports, in order]
    this.executions = new Map()     // id -> {payload, states, reads}
    this.created = []               // payloads of dl.executions.create
    this.calls = []                 // "scope:crud" of every message
    this.events = []                // what dl.sendEvent sent
    this.unknown = []
  }

  // ---- PeerAgent's side that the SDK uses -----------------------------------------------------
  async sendSync(message) {
    const { scope, crud } = message
    // What crosses the frame is data (postMessage clones it), not the script's objects.
    const data = message.data === undefined ? undefined : JSON.parse(JSON.stringify(message.data))
    this.calls.push(`${scope}:${crud}`)
    const handler = this.handlers()[`${scope}:${crud}`]
    if (!handler) {
      this.unknown.push(`${scope}:${crud}`)
      throw new Error(`fake host: ${scope}:${crud} is not implemented`)
    }
    return JSON.parse(JSON.stringify(handler(data)))  // what crosses the frame is data, not objects
  }

  sendEvent(event) {
    this.events.push(event)
  }

  handlers() {
    return {
      'project:read': (id) => this.byId([this.project], id, 'project'),
      'dataset:read': (id) => this.byId([this.dataset], id, 'dataset'),
      'model:query': (payload) => this.page(this.models.filter((m) => !payload.projectId ||
        (m.context || {}).project === payload.projectId)),
      'service:read': (id) => this.byId(this.services, id, 'service'),
      'execution:create': (payload) => this.createExecution(payload),
      'execution:read': (id) => this.readExecution(id),
    }
  }

  byId(entities, id, what) {
    if (id === undefined) return entities[0]  // the active one (dl.projects.get(), dl.datasets.get())
    const found = entities.find((e) => e.id === id)
    if (!found) throw new Error(`${what} ${id} not found`)
    return found
  }

  page(items) {
    return { items, totalItemsCount: items.length, totalPagesCount: 1, hasNextPage: false }
  }

  createExecution(payload) {
    const id = `execution-${this.executions.size + 1}`
    const states = this.onExecution(payload)
    this.created.push(payload)
    this.executions.set(id, { payload, states, reads: 0 })
    return this.execution(id, { status: 'created', percentComplete: 0 })
  }

  readExecution(id) {
    const record = this.executions.get(id)
    if (!record) throw new Error(`execution ${id} not found`)
    const state = record.states[Math.min(record.reads, record.states.length - 1)]
    record.reads += 1
    return this.execution(id, state)
  }

  execution(id, state) {
    const { payload } = this.executions.get(id)
    const service = this.services.find((s) => s.name === payload.serviceName)
    const { output, ...status } = state
    return {
      id, functionName: payload.functionName, serviceName: payload.serviceName, serviceId: service && service.id,
      projectId: payload.projectId, input: payload.input, output, createdAt: '2026-12-06T00:00:00.000Z',
      latestStatus: { timestamp: '2026-12-06T00:00:01.000Z', message: '', percentComplete: 0, ...status },
      statusLog: [], status: [], attempts: 1,
    }
  }

  toasts(type) {
    return this.events.filter((e) => e.name === 'app:toastMessage' && (!type || e.payload.type === type))
      .map((e) => e.payload.message)
  }
}

// The SDK's driver with the fake agent in place of the frame (xFrameDriver.init connects to the
// host's frame, which node has not; _initRepos is what init then does).
function sdkOn(host) {
  const driver = new xFrameDriver()
  driver.agent = host
  driver._initRepos()
  return driver
}

// panels/search.js run as the browser runs it: a script whose global `run` is called, with `dl` a
// global. Time is virtual: setTimeout advances the clock at once, so waits are instant and exact.
function loadPanel(host) {
  const clock = { now: 0 }
  const context = vm.createContext({
    dl: sdkOn(host),
    console: { log() {}, warn() {}, error() {} },
    setTimeout: (callback, ms) => { clock.now += ms; setImmediate(callback); return 0 },
    Date: { now: () => clock.now },
  })
  vm.runInContext(fs.readFileSync(SCRIPT, 'utf8'), context, { filename: SCRIPT })
  // What the script returns is data for the browser: compared as plain JSON (the script's objects belong
  // to its own realm, whose Object prototype is not this one's).
  const run = async (...args) => JSON.parse(JSON.stringify(await context.run(...args)))
  return { run, clock, constants: constantsOf(context) }
}

function constantsOf(context) {
  return JSON.parse(vm.runInContext('JSON.stringify({ CLIP_APP, SEARCH_FUNCTION, RESULTS, POLL_MS, WAIT_MS })', context))
}

module.exports = { FakeHost, loadPanel, sdkOn }
