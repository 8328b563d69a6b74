// CLIP text search for Dataloop's dataset browser: the `datasetBrowserSearch` panel of dataloop.json
// (components.panels "clip-text-search", opened by the toolbar at `datasetBrowserSearchOption`).
//
// The platform calls run(textInput, itemsQuery) with the panel's fields ({"Text Box", "Model"}) and the
// browser's current items query, and shows the items of the DQL query it returns (the contract of
// dataloop-ai-apps/clip-smart-search entire.js). This script embeds nothing itself: it runs
// `search_dataset` on the service of a deployed CLIP model of this app, so the query is embedded by
// that model's own text tower (a fine-tuned one's too), and returns the vector-search DQL the
// function ran: the browser then lists the nearest items first. `dl` is Dataloop's JS SDK
// (@dataloop-ai/jssdk); every call below is in its typings (docs/platform.md cites each).
// Tests: tests/js/search_panel.test.js (node --test, against a fake host under the SDK's own code).

const CLIP_APP = 'clip-model-pretrained'     // dataloop.json "name": this app's models
const SEARCH_FUNCTION = 'search_dataset'
const RESULTS = 100                          // k: the browser's first pages
const POLL_MS = 1000
const WAIT_MS = 45000                        // a user is waiting; a cold service takes minutes
const DEFAULT_FILTER = { $and: [{ hidden: false }, { type: 'file' }] }

class PanelProblem extends Error {
  constructor(message, type = 'error') {
    super(message)
    this.type = type
  }
}

function toast(message, type) {
  dl.sendEvent({ name: 'app:toastMessage', payload: { message, type } })
}

function field(textInput, name) {
  const value = textInput && typeof textInput === 'object' ? textInput[name] : undefined
  return typeof value === 'string' ? value.trim() : ''
}

function isDeployed(model) {
  const services = (((model.metadata || {}).system || {}).deploy || {}).services || []
  return model.status === 'deployed' && services.length > 0
}

function isThisAppsModel(model) {
  // A model installed from the app names it (IModel.app.dpkName); one without `app` (made through the
  // SDK) is taken by its module, as dataloop.json names it.
  return model.app ? model.app.dpkName === CLIP_APP : model.moduleName === 'clip-module'
}

async function pickModel(projectId, wanted) {
  const page = await dl.models.query({ projectId })
  const deployed = (page.items || []).filter((m) => isThisAppsModel(m) && isDeployed(m))
  if (deployed.length === 0) {
    throw new PanelProblem('No deployed CLIP model in this project: deploy one in Model Management ' +
      '(OpenAI CLIP, openai-clip), embed this dataset with it, then search again.')
  }
  const names = deployed.map((m) => m.name).join(', ')
  if (wanted) {
    const chosen = deployed.find((m) => m.name === wanted || m.id === wanted)
    if (!chosen) throw new PanelProblem(`No deployed CLIP model named "${wanted}"; deployed: ${names}.`)
    return chosen
  }
  if (deployed.length > 1) {
    throw new PanelProblem(`Several CLIP models are deployed (${names}): type the one to search with ` +
      'in the Model field.', 'warning')
  }
  return deployed[0]
}

function searchFilters(itemsQuery) {
  // search_dataset combines the browser's item filter with its own join on feature_vectors; DQL has
  // one join per query, so a join of the browser's (e.g. on annotations) cannot come along.
  if (itemsQuery && itemsQuery.join) {
    toast('CLIP search keeps the item filters but not the annotation filters of this view.', 'info')
  }
  return itemsQuery && itemsQuery.filter ? { filter: itemsQuery.filter } : null
}

async function waitForExecution(execution) {
  const started = Date.now()
  let current = execution
  for (;;) {
    const status = (current.latestStatus || {}).status
    if (status === 'success' || status === 'failed' || status === 'canceled') return current
    if (Date.now() - started >= WAIT_MS) {
      if (status === 'created' || !status) {
        throw new PanelProblem('The CLIP model\'s service is starting (it scales to zero when idle): ' +
          'search again in a minute.', 'warning')
      }
      throw new PanelProblem('The CLIP search is taking longer than usual: search again in a moment.', 'warning')
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS))
    current = await dl.executions.get(execution.id)
  }
}

function searchOutput(execution) {
  // How the agent stores a function's two outputs (items, json) in the execution cannot be seen
  // offline: by output name, as a list in order, or the json alone (docs/platform.md).
  for (const output of [execution.output, (execution.latestStatus || {}).output]) {
    if (!output) continue
    if (output.json && output.json.query) return output.json
    if (Array.isArray(output)) {
      const json = output.find((o) => o && o.query)
      if (json) return json
    }
    if (output.query) return output
  }
  return null
}

function failureMessage(execution) {
  const message = String((execution.latestStatus || {}).message || 'no reason given')
  const start = message.indexOf('CLIP adapter: ')
  return (start >= 0 ? message.slice(start + 'CLIP adapter: '.length) : message).slice(0, 400)
}

async function run(textInput, itemsQuery) {
  const fallback = { filter: (itemsQuery && itemsQuery.filter) || DEFAULT_FILTER, resource: 'items' }
  const text = field(textInput, 'Text Box')
  if (!text) {
    toast('Type what to look for, e.g. "a dog on the beach".', 'warning')
    return fallback
  }
  try {
    const dataset = await dl.datasets.get()
    const project = await dl.projects.get()
    const model = await pickModel(project.id, field(textInput, 'Model'))
    const service = await dl.services.get(model.metadata.system.deploy.services[0])
    const created = await dl.executions.create({
      functionName: SEARCH_FUNCTION,
      serviceName: service.name,
      projectId: service.projectId || project.id,
      input: { dataset: { dataset_id: dataset.id }, text, k: RESULTS, filters: searchFilters(itemsQuery) },
    })
    const execution = await waitForExecution(created)
    if (execution.latestStatus.status !== 'success') {
      throw new PanelProblem(`CLIP search failed: ${failureMessage(execution)}`)
    }
    const output = searchOutput(execution)
    if (!output) throw new PanelProblem('CLIP search returned no query (is the model an OpenAI CLIP one?)')
    if (output.results && output.results.length === 0) {
      toast(`No embedded item matches the filters (model ${model.name}).`, 'info')
    }
    return output.query
  } catch (error) {
    toast(error instanceof PanelProblem ? error.message : `CLIP search failed: ${error && error.message}`,
      error instanceof PanelProblem ? error.type : 'error')
    return fallback
  }
}
